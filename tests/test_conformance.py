"""Keep the emulator honest: the same requests to a real llama-server and to the emulator.

For every route the router serves or reads, both must answer the same status,
the same JSON keys (recursively; lists by their first element) and the same SSE
framing. Values differ (the real model emits random bytes), so they are not
compared. Subtrees of sampler settings, which the router never reads, are
compared only for presence.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from olla.sim import SimConfig, SimServer
from tests.llamacpp import LlamaServer, ServerSpec, free_port, tiny_model

ALIAS = "tiny-code"
SLOTS = 2
CTX = 1024
# Sampler and template settings: their many keys follow llama.cpp's sampler, not anything the router reads.
PRESENCE_ONLY = {
    "generation_settings", "params", "chat_template_caps", "ui_settings", "ui", "modalities",
    "architecture", "details", "capabilities", "tags",
}  # fmt: skip


def shape(value: Any, presence_only: bool = False) -> Any:
    if presence_only:
        return "…"
    if isinstance(value, dict):
        return {k: shape(v, k in PRESENCE_ONLY) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(value[0])] if value else []
    return None


def differences(real: Any, sim: Any, path: str = "$") -> list[str]:
    if isinstance(real, dict) and isinstance(sim, dict):
        out = [f"{path}.{k}: only in llama-server" for k in real.keys() - sim.keys()]
        out += [f"{path}.{k}: only in the emulator" for k in sim.keys() - real.keys()]
        for k in real.keys() & sim.keys():
            out += differences(real[k], sim[k], f"{path}.{k}")
        return out
    if isinstance(real, list) and isinstance(sim, list):
        if real and sim:
            return differences(real[0], sim[0], f"{path}[0]")
        return [] if bool(real) == bool(sim) else [f"{path}: empty in one, not the other"]
    if (real is None) != (sim is None) or type(real) is not type(sim):
        return [f"{path}: {type(real).__name__} in llama-server, {type(sim).__name__} in the emulator"]
    return []


class Answer:
    def __init__(self, status: int, content_type: str, body: bytes) -> None:
        self.status = status
        self.content_type = content_type.split(";")[0]
        self.body = body

    def structure(self) -> Any:
        if self.content_type == "text/event-stream":
            return sse_structure(self.body)
        if self.content_type == "application/json":
            return shape(orjson.loads(self.body))
        return self.content_type


def sse_structure(body: bytes) -> dict[str, Any]:
    """Framing and the shapes of the first, second, second-to-last and last events."""
    text = body.decode("utf-8", "replace")
    assert text.endswith("\n\n"), "an SSE body ends with a blank line"
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events), events[:3]
    payloads = [e[len("data: "):] for e in events]
    done = payloads[-1] == "[DONE]"
    documents = [orjson.loads(p) for p in (payloads[:-1] if done else payloads)]
    picks = {"first": documents[0], "second": documents[1], "before_last": documents[-2], "last": documents[-1]}
    return {"done": done, **{k: shape(v) for k, v in picks.items()}}


async def ask(session: aiohttp.ClientSession, base: str, method: str, path: str, body: Any = None,
              raw: bytes | None = None) -> Answer:  # fmt: skip
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    headers = {"Content-Type": "application/json"} if data is not None else {}
    async with session.request(method, base + path, data=data, headers=headers) as r:
        return Answer(r.status, r.headers.get("Content-Type", ""), await r.read())


@pytest.fixture(scope="module")
def real_server() -> AsyncIterator[str]:
    from tests.conftest import require_llama_server

    require_llama_server()
    spec = ServerSpec(model=tiny_model("code"), alias=ALIAS, slots=SLOTS, ctx_per_slot=CTX)
    server = LlamaServer(spec, free_port(), Path(tempfile.mkdtemp()) / "conformance.log")
    server.start()
    try:
        server.wait_ready()
        yield server.url
    finally:
        server.stop()


@pytest.fixture
async def sim_server() -> AsyncIterator[str]:
    sim = SimServer(SimConfig(model=ALIAS, slots=SLOTS, n_ctx=CTX, decode_ms=0.5, prefill_ms=0.01))
    await sim.start(host="127.0.0.1", port=0)
    yield sim.url
    await sim.stop()


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
# Greedy sampling and no early end of sequence make the real server's random-weight output repeatable,
# so every stream has the same number of events on both sides.
SAME = {"temperature": 0, "ignore_eos": True}
CASES: list[tuple[str, str, str, Any]] = [
    ("health", "GET", "/health", None),
    ("models", "GET", "/v1/models", None),
    ("props", "GET", "/props", None),
    ("slots", "GET", "/slots", None),
    ("completion", "POST", "/completion", {**SAME, "prompt": "Hello", "n_predict": 4}),
    ("completion-stream", "POST", "/completion", {**SAME, "prompt": "Hello", "n_predict": 4, "stream": True}),
    ("completions-native", "POST", "/completions", {**SAME, "prompt": "Hello", "n_predict": 4}),
    ("v1-completions", "POST", "/v1/completions", {**SAME, "model": ALIAS, "prompt": "Hello", "max_tokens": 4}),
    ("v1-completions-stream", "POST", "/v1/completions",
     {**SAME, "model": ALIAS, "prompt": "Hello", "max_tokens": 4, "stream": True}),
    ("chat", "POST", "/v1/chat/completions", {**SAME, "model": ALIAS, "messages": CHAT, "max_tokens": 4}),
    ("chat-stream", "POST", "/v1/chat/completions",
     {**SAME, "model": ALIAS, "messages": CHAT, "max_tokens": 4, "stream": True}),
    ("chat-stream-usage", "POST", "/v1/chat/completions",
     {**SAME, "model": ALIAS, "messages": CHAT, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}),
    ("embedding", "POST", "/embedding", {"content": "embed this"}),
    ("v1-embeddings", "POST", "/v1/embeddings", {"model": ALIAS, "input": ["one", "two"]}),
    ("tokenize", "POST", "/tokenize", {"content": "Hello, world!"}),
    ("tokenize-pieces", "POST", "/tokenize", {"content": "Hello", "with_pieces": True}),
    ("detokenize", "POST", "/detokenize", {"tokens": [75, 104, 111]}),
    ("infill", "POST", "/infill", {**SAME, "input_prefix": "def f(", "input_suffix": "):", "n_predict": 4}),
    ("infill-stream", "POST", "/infill",
     {**SAME, "input_prefix": "def f(", "input_suffix": "):", "n_predict": 4, "stream": True}),
    ("unknown-route", "POST", "/no/such/route", {}),
    ("get-on-post-route", "GET", "/completion", None),
    ("messages-missing", "POST", "/v1/chat/completions", {"model": ALIAS}),
    ("context-overflow", "POST", "/completion", {"prompt": "x" * 3000, "n_predict": 1}),
    ("context-overflow-stream", "POST", "/v1/chat/completions",
     {"model": ALIAS, "messages": [{"role": "user", "content": "x" * 3000}], "stream": True}),
]  # fmt: skip


@pytest.mark.parametrize(("name", "method", "path", "body"), CASES, ids=[c[0] for c in CASES])
async def test_same_status_keys_and_framing(real_server: str, sim_server: str, name, method, path, body) -> None:
    async with aiohttp.ClientSession() as session:
        real = await ask(session, real_server, method, path, body)
        sim = await ask(session, sim_server, method, path, body)
    assert (sim.status, sim.content_type) == (real.status, real.content_type), (real.body[:300], sim.body[:300])
    problems = differences(real.structure(), sim.structure())
    assert not problems, "\n".join(sorted(problems))


async def test_malformed_body_is_answered_alike(real_server: str, sim_server: str) -> None:
    """The pinned llama.cpp answers a JSON parse error with 500 server_error (newer builds say 400)."""
    async with aiohttp.ClientSession() as session:
        for path in ("/completion", "/v1/chat/completions", "/tokenize"):
            real = await ask(session, real_server, "POST", path, raw=b"{not json")
            sim = await ask(session, sim_server, "POST", path, raw=b"{not json")
            assert sim.status == real.status >= 400, path
            assert differences(real.structure(), sim.structure()) == [], path
            assert orjson.loads(sim.body)["error"]["type"] == orjson.loads(real.body)["error"]["type"], path


async def test_metrics_have_the_names_the_router_reads(real_server: str, sim_server: str) -> None:
    names = ("llamacpp:requests_processing", "llamacpp:requests_deferred", "llamacpp:prompt_tokens_total",
             "llamacpp:tokens_predicted_total")  # fmt: skip
    async with aiohttp.ClientSession() as session:
        real = await ask(session, real_server, "GET", "/metrics")
        sim = await ask(session, sim_server, "GET", "/metrics")
    assert real.status == sim.status == 200 and real.content_type == sim.content_type == "text/plain"
    real_names = {line.split()[0] for line in real.body.decode().splitlines() if line and not line.startswith("#")}
    sim_names = {line.split()[0] for line in sim.body.decode().splitlines() if line and not line.startswith("#")}
    assert set(names) <= real_names and set(names) <= sim_names
    assert real_names == sim_names


async def test_loading_answers_503_on_every_route_in_both(sim_server: str) -> None:
    """A real llama-server whose model file is a FIFO nobody writes stays in its loading phase."""
    from tests.conftest import require_llama_server

    binary = require_llama_server()
    fifo = Path(tempfile.mkdtemp()) / "never-loads.gguf"
    os.mkfifo(fifo)
    port = free_port()
    process = subprocess.Popen([binary, "-m", str(fifo), "--host", "127.0.0.1", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    sim = SimServer(SimConfig(model=ALIAS, slots=SLOTS, load_seconds=30.0))
    await sim.start(host="127.0.0.1", port=0)
    try:
        async with aiohttp.ClientSession() as session:
            real_base = f"http://127.0.0.1:{port}"
            for _ in range(500):
                try:
                    await ask(session, real_base, "GET", "/health")
                    break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.01)
            for method, path, body in [("GET", "/health", None), ("GET", "/v1/models", None),
                                       ("POST", "/completion", {"prompt": "x"}), ("GET", "/props", None)]:  # fmt: skip
                real = await ask(session, real_base, method, path, body)
                emulated = await ask(session, sim.url, method, path, body)
                assert real.status == emulated.status == 503, path
                assert orjson.loads(real.body) == orjson.loads(emulated.body), path
    finally:
        await sim.stop()
        process.kill()
        process.wait()
