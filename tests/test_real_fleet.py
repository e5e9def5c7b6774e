"""Through the router to three real llama-servers serving two models, as a user would call it.

The OpenAI Python SDK for the OpenAI routes, raw HTTP for llama.cpp's native ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import TestClient

from olla.app import create_app
from olla.config import parse_config
from tests.llamacpp import LlamaServers, ServerSpec, tiny_model
from tests.routerkit import RouterServer, wait_until

CHAT, CODE = "tiny-chat", "tiny-code"


@dataclass
class Fleet:
    servers: LlamaServers
    client: TestClient
    base: str  # the router's /olla/llamacpp prefix as an absolute URL

    def sdk(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
async def fleet(start_llama_servers: Callable[..., LlamaServers], aiohttp_client) -> AsyncIterator[Fleet]:
    chat = ServerSpec(model=tiny_model("chat"), alias=CHAT, slots=2)
    code = ServerSpec(model=tiny_model("code"), alias=CODE, slots=2)
    servers = start_llama_servers(chat, chat, code)
    endpoints = [
        {"name": name, "url": s.url, "type": "llamacpp", "check_interval": "300ms", "check_timeout": "250ms"}
        for name, s in zip(("chat-a", "chat-b", "code-a"), servers)
    ]
    config = parse_config({"discovery": {"static": {"endpoints": endpoints}},
                           "logging": {"level": "warning"}}, "<test>")  # fmt: skip
    app = create_app(config)
    client = await aiohttp_client(RouterServer(app))
    registry = app.registry
    await wait_until(registry, lambda: all(e.routable and e.discovery for e in registry))
    yield Fleet(servers, client, str(client.make_url("/olla/llamacpp")))


def assert_olla_headers(headers, endpoint_prefix: str, model: str) -> None:  # type: ignore[no-untyped-def]
    assert headers["X-Olla-Endpoint"].startswith(endpoint_prefix)
    assert headers["X-Olla-Backend-Type"] == "llamacpp"
    assert headers["X-Olla-Model"] == model
    assert headers["X-Olla-Request-Id"]
    assert headers["X-Olla-Response-Time"].endswith("ms")
    assert headers["Via"].startswith("1.1 olla/")


async def test_openai_sdk_chat_completions_and_embeddings(fleet: Fleet) -> None:
    async with fleet.sdk() as sdk:
        await _sdk_calls(sdk)


async def _sdk_calls(sdk: openai.AsyncOpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    raw = await sdk.chat.completions.with_raw_response.create(model=CHAT, messages=messages, max_tokens=8)
    assert_olla_headers(raw.headers, "chat-", CHAT)
    chat = raw.parse()
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.usage is not None and chat.usage.completion_tokens > 0

    stream = await sdk.chat.completions.create(model=CHAT, messages=messages, max_tokens=8, stream=True)
    chunks = [chunk async for chunk in stream]
    # The role-only first chunk is usually there, but llama-server skips it now and then when the
    # tiny model's first token is an incomplete UTF-8 sequence; the framing is what the router owns.
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    assert {c.choices[0].delta.role for c in chunks if c.choices} <= {"assistant", None}
    assert any(c.choices and c.choices[0].finish_reason for c in chunks)

    completion = await sdk.completions.create(model=CODE, prompt="def add(a, b):", max_tokens=6)
    assert completion.object == "text_completion" and completion.choices[0].text is not None
    # Greedy: the same events every run (random weights may otherwise hold bytes back into one event).
    stream = await sdk.completions.create(model=CODE, prompt="def add(a, b):", max_tokens=16, stream=True,
                                          temperature=0, extra_body={"ignore_eos": True})
    parts = [c async for c in stream]
    assert len(parts) >= 2 and parts[-1].choices[0].finish_reason in ("length", "stop")

    embeddings = await sdk.embeddings.create(model=CHAT, input=["first document", "second", "third one"])
    assert [d.index for d in embeddings.data] == [0, 1, 2]
    assert len({len(d.embedding) for d in embeddings.data}) == 1 and len(embeddings.data[0].embedding) == 128


async def test_models_list_through_the_sdk_names_both_models(fleet: Fleet) -> None:
    async with fleet.sdk() as sdk:
        models = await sdk.models.list()
    assert sorted(m.id for m in models.data) == [CHAT, CODE]


async def test_native_routes_with_the_model_in_a_header(fleet: Fleet) -> None:
    c = fleet.client
    r = await c.post("/olla/llamacpp/completion", json={"prompt": "Hi", "n_predict": 4, "ignore_eos": True},
                     headers={"X-Olla-Model": CHAT})  # fmt: skip
    assert r.status == 200, await r.text()
    assert_olla_headers(r.headers, "chat-", CHAT)
    body = await r.json()
    assert body["stop"] is True and body["tokens_predicted"] == 4

    r = await c.post("/olla/llamacpp/completion", json={"prompt": "Hi", "n_predict": 4, "stream": True},
                     headers={"X-Olla-Model": CHAT})  # fmt: skip
    events = [line for line in (await r.text()).split("\n\n") if line]
    assert r.headers["Content-Type"].startswith("text/event-stream")
    assert all(e.startswith("data: ") for e in events)
    assert orjson.loads(events[-1][6:])["stop"] is True and "[DONE]" not in events[-1]

    r = await c.post("/olla/llamacpp/embedding", json={"content": "embed me"}, headers={"X-Olla-Model": CHAT})
    assert r.status == 200 and isinstance((await r.json())[0]["embedding"], list)

    text = "Hello, world! This is a test."
    r = await c.post("/olla/llamacpp/tokenize", json={"content": text}, headers={"X-Olla-Model": CODE})
    tokens = (await r.json())["tokens"]
    assert r.headers["X-Olla-Endpoint"] == "code-a" and len(tokens) > 5
    r = await c.post("/olla/llamacpp/detokenize", json={"tokens": tokens}, headers={"X-Olla-Model": CODE})
    assert (await r.json())["content"].strip() == text

    r = await c.post("/olla/llamacpp/infill", headers={"X-Olla-Model": CODE},
                     json={"input_prefix": "def f(n):\n    ", "input_suffix": "\n    return n", "n_predict": 5})  # fmt: skip
    assert r.status == 200, await r.text()
    assert r.headers["X-Olla-Endpoint"] == "code-a"
    assert "content" in await r.json()


async def test_requests_reach_only_endpoints_serving_their_model(fleet: Fleet) -> None:
    seen: dict[str, set[str]] = {CHAT: set(), CODE: set()}
    for model in [CHAT, CODE] * 6:
        r = await fleet.client.post("/olla/llamacpp/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 1})
        assert r.status == 200
        seen[model].add(r.headers["X-Olla-Endpoint"])
    assert seen == {CHAT: {"chat-a", "chat-b"}, CODE: {"code-a"}}


async def test_unknown_model_and_missing_model_errors_are_openai_shaped(fleet: Fleet) -> None:
    async with fleet.sdk() as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    r = await fleet.client.post("/olla/llamacpp/tokenize", json={"content": "x"})
    body = await r.json()
    assert r.status == 400 and body["error"]["code"] == "model_required"
    assert CHAT in body["error"]["message"] and CODE in body["error"]["message"]


async def test_a_killed_instance_is_failed_over_without_the_client_noticing(fleet: Fleet) -> None:
    fleet.servers[0].kill()
    statuses = []
    endpoints = set()
    for _ in range(6):
        r = await fleet.client.post("/olla/llamacpp/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": 2})
        statuses.append(r.status)
        endpoints.add(r.headers.get("X-Olla-Endpoint"))
        await r.read()
    assert statuses == [200] * 6
    assert endpoints == {"chat-b"}
    status = await (await fleet.client.get("/internal/status/endpoints")).json()
    dead = next(e for e in status["endpoints"] if e["name"] == "chat-a")
    assert dead["status"] == "offline"


async def test_streamed_tokens_reach_the_client_as_they_are_produced(fleet: Fleet) -> None:
    """Each SSE event is forwarded as the real server writes it, not buffered to the end."""
    body = {"prompt": "Stream", "n_predict": 300, "stream": True, "ignore_eos": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(fleet.base + "/completion", json=body, headers={"X-Olla-Model": CHAT}) as r:
            arrivals = []
            loop = asyncio.get_running_loop()
            async for _ in r.content.iter_any():
                arrivals.append(loop.time())
    assert len(arrivals) > 10, "the stream arrived in a handful of chunks: it was buffered"
    assert arrivals[-1] - arrivals[0] > 0.01


async def test_connection_reuse_survives_llama_server_closing_after_streams(fleet: Fleet) -> None:
    """llama-server closes a connection after a streamed reply; the next request must not see it as a failure."""
    decisions = []
    for i in range(30):
        body = {"model": CODE, "prompt": "x", "max_tokens": 2, "stream": i % 2 == 0}
        r = await fleet.client.post("/olla/llamacpp/v1/completions", json=body)
        await r.read()
        assert r.status == 200
        decisions.append(r.headers["X-Olla-Routing-Decision"])
    code = fleet.client.app.registry.endpoints["code-a"]
    assert decisions == ["routed"] * 30
    assert code.errors == 0 and code.routable


@pytest.fixture
async def chat_fleet(start_llama_servers, aiohttp_client) -> AsyncIterator[tuple[LlamaServers, TestClient]]:
    """Three real servers with 2 slots each, all serving the chat model, behind a slot-aware router."""
    spec = ServerSpec(model=tiny_model("chat"), alias=CHAT, slots=2, ctx_per_slot=2048)
    servers = start_llama_servers(spec, spec, spec)
    endpoints = [{"name": f"chat-{i}", "url": s.url, "type": "llamacpp", "check_interval": "300ms",
                  "check_timeout": "250ms"} for i, s in enumerate(servers)]  # fmt: skip
    config = parse_config({"discovery": {"static": {"endpoints": endpoints}},
                           "proxy": {"load_balancer": "slot-aware"}, "logging": {"level": "warning"}}, "<test>")  # fmt: skip
    client = await aiohttp_client(RouterServer(create_app(config)))
    registry = client.app.registry
    await wait_until(registry, lambda: all(e.routable and e.discovery for e in registry))
    assert {e.slots.total for e in registry} == {2}  # learned from /props
    yield servers, client


async def test_six_long_generations_spread_two_per_instance(chat_fleet) -> None:
    servers, client = chat_fleet
    body = {"prompt": "Spread", "n_predict": 600, "ignore_eos": True, "stream": True}

    async def one() -> str:
        r = await client.post("/olla/llamacpp/completion", json=body, headers={"X-Olla-Model": CHAT})
        await r.read()
        assert r.status == 200
        return r.headers["X-Olla-Endpoint"]

    served = await asyncio.gather(*(one() for _ in range(6)))
    assert sorted(served) == ["chat-0", "chat-0", "chat-1", "chat-1", "chat-2", "chat-2"]


async def test_the_second_turn_goes_home_and_hits_the_kv_cache(chat_fleet) -> None:
    _, client = chat_fleet
    system = {"role": "system", "content": "You answer in one short sentence. " * 12}
    messages = [system, {"role": "user", "content": "What is a slot?"}]
    first = await client.post("/olla/llamacpp/v1/chat/completions",
                              json={"model": CHAT, "messages": messages, "max_tokens": 8, "temperature": 0})  # fmt: skip
    reply = (await first.json())["choices"][0]["message"]
    messages += [{"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "And a queue?"}]
    for _ in range(2):  # other traffic in between must not move the conversation
        await client.post("/olla/llamacpp/v1/completions", json={"model": CHAT, "prompt": "noise", "max_tokens": 2})
    second = await client.post("/olla/llamacpp/v1/chat/completions",
                               json={"model": CHAT, "messages": messages, "max_tokens": 8})  # fmt: skip
    body = await second.json()
    assert second.headers["X-Olla-Endpoint"] == first.headers["X-Olla-Endpoint"]
    assert second.headers["X-Olla-Affinity"] == "hit"
    assert body["timings"]["cache_n"] > 0


async def _processing(servers: LlamaServers) -> int:
    async with aiohttp.ClientSession() as session:
        total = 0
        for server in servers:
            async with session.get(server.url + "/slots") as r:
                total += sum(1 for slot in await r.json() if slot["is_processing"])
        return total


async def _until_idle(servers: LlamaServers, timeout: float) -> float:
    """Seconds until every real server's /slots shows no slot processing (polled at 100 ms, not faster)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await _processing(servers):
        assert loop.time() - started < timeout, "slots still busy after the client left"
        await asyncio.sleep(0.1)
    return loop.time() - started


async def test_a_client_that_leaves_frees_real_slots(chat_fleet) -> None:
    """Mid-stream, mid-generation and while queued in the router: llama-server's /slots shows them idle."""
    servers, client = chat_fleet
    long = {"model": CHAT, "prompt": "Leave", "max_tokens": 1500, "ignore_eos": True}
    stream = await client.post("/olla/llamacpp/v1/completions", json={**long, "stream": True})
    await stream.content.readline()
    assert await _processing(servers) == 1
    stream.close()
    assert await _until_idle(servers, 3.0) < 3.0

    generating = asyncio.create_task(client.post("/olla/llamacpp/v1/completions", json=long))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3
    while await _processing(servers) == 0:
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    generating.cancel()
    assert await _until_idle(servers, 3.0) < 3.0

    # Fill all six slots, queue a seventh in the router, then everybody leaves.
    holders = [asyncio.create_task(client.post("/olla/llamacpp/v1/completions", json=long)) for _ in range(6)]
    waitlists = client.app.queue.waitlists
    deadline = loop.time() + 5
    while await _processing(servers) < 6:
        assert loop.time() < deadline
        await asyncio.sleep(0.05)
    queued = asyncio.create_task(client.post("/olla/llamacpp/v1/completions", json=long))
    while sum(len(w.waiters) for w in waitlists.values()) < 1:
        assert loop.time() < deadline
        await asyncio.sleep(0.01)
    queued.cancel()
    for holder in holders:
        holder.cancel()
    assert await _until_idle(servers, 3.0) < 3.0
    assert sum(len(w.waiters) for w in waitlists.values()) == 0
    assert all(e.slots.own == 0 for e in client.app.registry)
