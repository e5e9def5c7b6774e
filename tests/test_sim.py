"""The emulated llama-server's routes: status codes, JSON shapes, streams, auth, loading.

Shapes are checked as key sets copied from a real llama-server (see
/work/shared/reference/llama-server-api.md); values only where the emulator
promises them.
"""

from __future__ import annotations

import asyncio
import base64
import math
import struct
from typing import Any

import aiohttp
import orjson
import pytest

from olla.sim import SimConfig, SimServer

TIMINGS = {
    "cache_n",
    "prompt_n",
    "prompt_ms",
    "prompt_per_token_ms",
    "prompt_per_second",
    "predicted_n",
    "predicted_ms",
    "predicted_per_token_ms",
    "predicted_per_second",
}
NATIVE_PARTIAL = {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"}
NATIVE_FINAL = {
    "index",
    "content",
    "tokens",
    "id_slot",
    "stop",
    "model",
    "tokens_predicted",
    "tokens_evaluated",
    "generation_settings",
    "prompt",
    "has_new_line",
    "truncated",
    "stop_type",
    "stopping_word",
    "tokens_cached",
    "timings",
}
USAGE = {"completion_tokens", "prompt_tokens", "total_tokens", "prompt_tokens_details"}


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as r:
        raw = await r.read()
        if r.content_type == "application/json":
            return r.status, orjson.loads(raw)
        return r.status, raw.decode()


def sse(text: str) -> list[str]:
    """The payloads of `data:` events, in order."""
    return [e.removeprefix("data: ") for e in text.split("\n\n") if e.startswith("data: ")]


def error_of(body: Any, code: int, type_: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code and error["type"] == type_ and isinstance(error["message"], str)
    return error


# --- health, models, props, slots, metrics -----------------------------------


async def test_health_models_and_props_describe_the_server(start_sim, sim_session) -> None:
    sim = await start_sim(slots=3, n_ctx=2048)
    for path in ("/health", "/v1/health"):
        async with sim_session.get(sim.url + path) as r:
            assert r.status == 200 and await r.json() == {"status": "ok"}
            assert r.headers["Server"] == "llama.cpp"
    for path in ("/v1/models", "/models"):
        status, body = await call(sim_session, "GET", sim.url + path)
        assert status == 200 and set(body) == {"models", "object", "data"} and body["object"] == "list"
        (model,) = body["data"]
        assert {"id", "aliases", "tags", "object", "created", "owned_by", "meta"} <= set(model)
        assert model["id"] == "chat-model" and model["aliases"] == ["chat-model"]
        assert model["object"] == "model" and model["owned_by"] == "llamacpp"
        meta = {"vocab_type", "n_vocab", "n_ctx", "n_ctx_train", "n_embd", "n_params", "size"}
        assert meta <= set(model["meta"]) and model["meta"]["n_ctx"] == 2048
        assert body["models"][0]["name"] == "chat-model" and "details" in body["models"][0]
    status, props = await call(sim_session, "GET", sim.url + "/props")
    assert status == 200
    assert {
        "default_generation_settings",
        "total_slots",
        "model_alias",
        "model_path",
        "modalities",
        "chat_template",
        "bos_token",
        "eos_token",
        "build_info",
        "is_sleeping",
        "endpoint_slots",
        "endpoint_metrics",
    } <= set(props)
    assert props["total_slots"] == 3 and props["model_alias"] == "chat-model"
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert "temperature" in props["default_generation_settings"]["params"]


async def test_slots_show_each_slot_and_its_last_task(start_sim, sim_session) -> None:
    sim = await start_sim(slots=2)
    status, slots = await call(sim_session, "GET", sim.url + "/slots")
    assert status == 200 and [s["id"] for s in slots] == [0, 1]
    assert all(set(s) == {"id", "n_ctx", "speculative", "is_processing"} for s in slots)
    await call(sim_session, "POST", sim.url + "/completion", json={"prompt": "hello", "n_predict": 3})
    _, slots = await call(sim_session, "GET", sim.url + "/slots")
    used = next(s for s in slots if "id_task" in s)
    assert {"id_task", "n_prompt_tokens", "params", "next_token"} <= set(used)
    assert used["is_processing"] is False and used["n_prompt_tokens"] >= 6
    assert {"has_next_token", "n_remain", "n_decoded"} <= set(used["next_token"][0])


async def test_metrics_count_tokens_in_prometheus_text(start_sim, sim_session) -> None:
    sim = await start_sim()
    await call(sim_session, "POST", sim.url + "/completion", json={"prompt": "hello", "n_predict": 4})
    async with sim_session.get(sim.url + "/metrics") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert r.headers["Process-Start-Time-Unix"].isdigit()
        text = await r.text()
    samples = dict(line.split(" ") for line in text.splitlines() if not line.startswith("#"))
    assert samples["llamacpp:prompt_tokens_total"] == "6"
    assert samples["llamacpp:tokens_predicted_total"] == "4"
    assert samples["llamacpp:requests_processing"] == "0"
    assert samples["llamacpp:requests_deferred"] == "0"
    assert "# TYPE llamacpp:prompt_tokens_total counter" in text


async def test_disabled_features_answer_501(start_sim, sim_session) -> None:
    sim = await start_sim(embeddings=False, infill=False, metrics=False, slots_endpoint=False)
    for method, path, body in [
        ("GET", "/metrics", None),
        ("GET", "/slots", None),
        ("POST", "/embedding", {"content": "x"}),
        ("POST", "/v1/embeddings", {"input": "x"}),
        ("POST", "/infill", {"input_prefix": "a", "input_suffix": "b"}),
        ("POST", "/props", {}),
    ]:
        status, reply = await call(sim_session, method, sim.url + path, json=body)
        assert status == 501, path
        error_of(reply, 501, "not_supported_error")


# --- generation ------------------------------------------------------------


async def test_native_completion_and_its_stream_which_has_no_done(start_sim, sim_session) -> None:
    sim = await start_sim()
    status, body = await call(sim_session, "POST", sim.url + "/completion", json={"prompt": "Hello", "n_predict": 3})
    assert status == 200 and set(body) == NATIVE_FINAL
    assert set(body["timings"]) == TIMINGS and body["model"] == "chat-model"
    assert body["tokens_predicted"] == 3 and body["tokens_evaluated"] == 6 and len(body["content"]) == 3
    assert body["stop"] is True and body["stop_type"] == "limit" and body["id_slot"] in (0, 1)
    assert body["prompt"] == "<s>Hello"

    status, text = await call(
        sim_session, "POST", sim.url + "/completions", json={"prompt": "Hello", "n_predict": 3, "stream": True}
    )
    events = sse(text)
    assert "[DONE]" not in events and len(events) == 4
    partials = [orjson.loads(e) for e in events[:-1]]
    assert all(set(p) == NATIVE_PARTIAL and p["stop"] is False and p["id_slot"] == -1 for p in partials)
    assert [p["tokens_predicted"] for p in partials] == [1, 2, 3]
    final = orjson.loads(events[-1])
    assert set(final) == NATIVE_FINAL and final["stop"] is True and final["content"] == ""


async def test_openai_completion_and_its_stream_ending_in_done(start_sim, sim_session) -> None:
    sim = await start_sim()
    body = {"prompt": "Hello", "max_tokens": 2, "model": "anything"}
    status, reply = await call(sim_session, "POST", sim.url + "/v1/completions", json=body)
    assert status == 200
    assert set(reply) == {"choices", "created", "model", "system_fingerprint", "object", "usage", "id", "timings"}
    assert reply["object"] == "text_completion" and reply["model"] == "chat-model"
    assert reply["choices"][0]["finish_reason"] == "length" and set(reply["usage"]) == USAGE

    async with sim_session.post(sim.url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.headers["Content-Type"] == "text/event-stream" and r.headers["X-Accel-Buffering"] == "no"
        events = sse(await r.text())
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]
    assert "usage" in chunks[-1] and set(chunks[-1]["timings"]) == TIMINGS
    assert all("usage" not in c for c in chunks[:-1])


async def test_chat_and_its_stream_starting_with_a_role_delta(start_sim, sim_session) -> None:
    sim = await start_sim()
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, reply = await call(sim_session, "POST", sim.url + "/v1/chat/completions", json=body)
    assert status == 200 and reply["object"] == "chat.completion" and reply["id"].startswith("chatcmpl-")
    assert reply["choices"][0]["message"]["role"] == "assistant" and len(reply["choices"][0]["message"]["content"]) == 3
    assert set(reply["usage"]) == USAGE and "cached_tokens" in reply["usage"]["prompt_tokens_details"]
    assert set(reply["timings"]) == TIMINGS

    status, text = await call(sim_session, "POST", sim.url + "/chat/completions", json={**body, "stream": True})
    events = sse(text)
    assert events[-1] == "[DONE]"
    chunks = [orjson.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    assert [set(c["choices"][0]["delta"]) for c in chunks[1:4]] == [{"content"}] * 3
    assert chunks[-1]["choices"][0] == {"finish_reason": "length", "index": 0, "delta": {}}
    assert set(chunks[-1]["timings"]) == TIMINGS and all("timings" not in c for c in chunks[:-1])
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)

    with_usage = {**body, "stream": True, "stream_options": {"include_usage": True}}
    _, text = await call(sim_session, "POST", sim.url + "/v1/chat/completions", json=with_usage)
    chunks = [orjson.loads(e) for e in sse(text)[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and set(chunks[-1]["usage"]) == USAGE and "timings" in chunks[-1]


async def test_without_a_limit_the_model_stops_as_if_at_eos(start_sim, sim_session) -> None:
    sim = await start_sim(n_predict=5)
    _, native = await call(sim_session, "POST", sim.url + "/completion", json={"prompt": "x"})
    assert native["tokens_predicted"] == 5 and native["stop_type"] == "eos"
    _, reply = await call(sim_session, "POST", sim.url + "/v1/chat/completions", json={"messages": []})
    assert reply["usage"]["completion_tokens"] == 5 and reply["choices"][0]["finish_reason"] == "stop"


async def test_generation_stops_when_the_context_is_full(start_sim, sim_session) -> None:
    sim = await start_sim(n_ctx=32)
    _, native = await call(sim_session, "POST", sim.url + "/completion", json={"prompt": "x" * 20, "n_predict": 100})
    assert native["tokens_predicted"] == 32 - 21 and native["truncated"] is True and native["stop_type"] == "limit"


async def test_infill_answers_like_a_native_completion(start_sim, sim_session) -> None:
    sim = await start_sim()
    body = {"input_prefix": "def f(", "input_suffix": ")\n", "input_extra": [{"filename": "a.py", "text": "x"}]}
    status, reply = await call(sim_session, "POST", sim.url + "/infill", json={**body, "n_predict": 2})
    assert status == 200 and set(reply) == NATIVE_FINAL
    assert "<|fim_prefix|>def f(<|fim_suffix|>)\n<|fim_middle|>" in reply["prompt"]
    status, text = await call(sim_session, "POST", sim.url + "/infill", json={**body, "n_predict": 2, "stream": True})
    assert len(sse(text)) == 3 and "[DONE]" not in text
    status, reply = await call(sim_session, "POST", sim.url + "/infill", json={"input_prefix": "a"})
    error_of(reply, 500, "server_error")


async def test_embeddings_native_and_openai(start_sim, sim_session) -> None:
    sim = await start_sim()
    status, native = await call(sim_session, "POST", sim.url + "/embedding", json={"content": "hi"})
    assert status == 200 and [set(e) for e in native] == [{"index", "embedding"}]
    (vector,) = native[0]["embedding"]
    assert len(vector) == 128 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-6)
    _, several = await call(sim_session, "POST", sim.url + "/embeddings", json={"input": ["hi", "yo"]})
    assert [e["index"] for e in several] == [0, 1] and several[0]["embedding"] == native[0]["embedding"]

    status, oai = await call(
        sim_session, "POST", sim.url + "/v1/embeddings", json={"input": ["hi", "yo"], "model": "foo"}
    )
    assert status == 200 and set(oai) == {"model", "object", "usage", "data"} and oai["model"] == "foo"
    assert oai["usage"] == {"prompt_tokens": 6, "total_tokens": 6}
    assert [set(d) for d in oai["data"]] == [{"embedding", "index", "object"}] * 2
    assert oai["data"][0]["embedding"] == vector and oai["data"][1]["embedding"] != vector
    as_base64 = {"input": "hi", "encoding_format": "base64"}
    _, packed = await call(sim_session, "POST", sim.url + "/v1/embeddings", json=as_base64)
    assert packed["model"] == "chat-model"
    raw = base64.b64decode(packed["data"][0]["embedding"])
    assert list(struct.unpack("<128f", raw)) == pytest.approx(vector, rel=1e-6)

    status, reply = await call(sim_session, "POST", sim.url + "/v1/embeddings", json={})
    error_of(reply, 400, "invalid_request_error")
    status, reply = await call(sim_session, "POST", sim.url + "/v1/embeddings", json={"input": "a" * 600})
    error_of(reply, 500, "server_error")


async def test_tokenize_detokenize_and_apply_template(start_sim, sim_session) -> None:
    sim = await start_sim()
    _, reply = await call(sim_session, "POST", sim.url + "/tokenize", json={"content": "hé"})
    assert reply == {"tokens": [107, 198, 172]}
    with_pieces = {"content": "hé", "with_pieces": True, "add_special": True}
    _, reply = await call(sim_session, "POST", sim.url + "/tokenize", json=with_pieces)
    pieces = [(1, "<s>"), (107, "h"), (198, [195]), (172, [169])]
    assert reply == {"tokens": [{"id": i, "piece": p} for i, p in pieces]}
    _, reply = await call(sim_session, "POST", sim.url + "/detokenize", json={"tokens": [1, 107, 198, 172]})
    assert reply == {"content": "<s>hé"}
    parts = [{"type": "text", "text": "hi"}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    _, reply = await call(sim_session, "POST", sim.url + "/apply-template", json={"messages": messages})
    chatml = "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert reply == {"prompt": chatml}


async def test_a_stream_ends_by_closing_its_connection_a_plain_reply_keeps_it(start_sim) -> None:
    sim = await start_sim()
    reader, writer = await asyncio.open_connection("127.0.0.1", sim.port)

    def post(body: dict[str, Any]) -> bytes:
        raw = orjson.dumps(body)
        head = f"POST /completion HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\nContent-Length: {len(raw)}"
        return head.encode() + b"\r\n\r\n" + raw

    try:
        for _ in range(2):
            writer.write(post({"prompt": "x", "n_predict": 2}))
            head = (await reader.readuntil(b"\r\n\r\n")).decode()
            assert head.startswith("HTTP/1.1 200") and "Connection: close" not in head
            length = int(head.lower().split("content-length: ")[1].split("\r\n")[0])
            await reader.readexactly(length)
        writer.write(post({"prompt": "x", "n_predict": 2, "stream": True}))
        rest = await asyncio.wait_for(reader.read(), 5)  # EOF: the server hung up
        assert rest.startswith(b"HTTP/1.1 200") and b"Connection: close" not in rest
        assert rest.endswith(b"0\r\n\r\n")
    finally:
        writer.close()


# --- errors, auth, loading -------------------------------------------------------


async def test_unknown_paths_and_wrong_methods_are_404(start_sim, sim_session) -> None:
    sim = await start_sim()
    expected = {"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}
    for method, path in [("GET", "/nope"), ("GET", "/v1/chat/completions"), ("POST", "/health"), ("GET", "/tokenize")]:
        status, body = await call(sim_session, method, sim.url + path)
        assert (status, body) == (404, expected), (method, path)


async def test_bad_bodies_get_llama_server_errors(start_sim, sim_session) -> None:
    sim = await start_sim()
    # This llama-server build (0.5.0-dev, from llama-cpp-python 0.3.36) answers malformed JSON 500, not 400.
    status, body = await call(sim_session, "POST", sim.url + "/v1/chat/completions", data=b"{bad")
    assert status == 500
    assert error_of(body, 500, "server_error")["message"].startswith("[json.exception.parse_error.101]")
    for path, payload, message in [
        ("/v1/chat/completions", {}, "'messages' is required"),
        ("/v1/chat/completions", {"messages": "x"}, "Expected 'messages' to be an array"),
        ("/completion", {}, "[json.exception.out_of_range.403] key 'prompt' not found"),
        ("/completion", {"prompt": "x", "n_predict": "a"}, "Field 'n_predict'"),
    ]:
        status, body = await call(sim_session, "POST", sim.url + path, json=payload)
        assert status == 400 and error_of(body, 400, "invalid_request_error")["message"].startswith(message), body


@pytest.mark.parametrize("path", ["/completion", "/v1/completions", "/v1/chat/completions"])
async def test_a_prompt_over_the_context_is_a_plain_400_even_when_streaming(start_sim, sim_session, path) -> None:
    sim = await start_sim(n_ctx=64)
    body = {"prompt": "x" * 100, "messages": [{"role": "user", "content": "x" * 100}], "stream": True}
    async with sim_session.post(sim.url + path, json=body) as r:
        assert r.status == 400 and r.content_type == "application/json"
        error = error_of(await r.json(), 400, "exceed_context_size_error")
    assert error["n_ctx"] == 64 and error["n_prompt_tokens"] > 64
    assert sim.busy_slots == 0


async def test_the_api_key_guards_everything_but_health(start_sim, sim_session) -> None:
    sim = await start_sim(api_key="sekrit")
    denied = {"error": {"message": "Invalid API Key", "type": "authentication_error", "code": 401}}
    assert (await call(sim_session, "GET", sim.url + "/health"))[0] == 200
    assert (await call(sim_session, "GET", sim.url + "/v1/health"))[0] == 200
    for path in ("/v1/models", "/props", "/slots", "/metrics", "/nope"):
        assert await call(sim_session, "GET", sim.url + path) == (401, denied)
    wrong = {"Authorization": "Bearer wrong"}
    assert await call(sim_session, "GET", sim.url + "/v1/models", headers=wrong) == (401, denied)
    assert (
        await call(sim_session, "GET", sim.url + "/v1/models", headers={"Authorization": "Bearer sekrit"})
    )[0] == 200
    assert (await call(sim_session, "GET", sim.url + "/v1/models", headers={"X-Api-Key": "sekrit"}))[0] == 200
    both = {"Authorization": "Bearer wrong", "X-Api-Key": "sekrit"}
    assert (await call(sim_session, "GET", sim.url + "/v1/models", headers=both))[0] == 401
    assert (await call(sim_session, "GET", sim.url + "/nope", headers={"X-Api-Key": "sekrit"}))[0] == 404


async def test_every_path_answers_503_while_loading_then_the_server_is_ready(start_sim, sim_session) -> None:
    sim = await start_sim(load_seconds=0.4, api_key="sekrit")
    loading = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/completion"), ("GET", "/nope")]:
        assert await call(sim_session, method, sim.url + path) == (503, loading), path
    await asyncio.sleep(0.5)
    assert await call(sim_session, "GET", sim.url + "/health") == (200, {"status": "ok"})
    assert (await call(sim_session, "GET", sim.url + "/v1/models"))[0] == 401


async def test_the_model_field_is_never_checked(start_sim, sim_session) -> None:
    sim = await start_sim()
    body = {"model": "whatever-unknown", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    status, reply = await call(sim_session, "POST", sim.url + "/v1/chat/completions", json=body)
    assert status == 200 and reply["model"] == "chat-model"


async def test_the_app_also_runs_under_pytest_aiohttp(aiohttp_server, sim_session) -> None:
    sim = SimServer(SimConfig(model="m", decode_ms=0.0))
    server = await aiohttp_server(sim.app)  # its runner cancels handlers too
    url = str(server.make_url("/completion"))
    status, body = await call(sim_session, "POST", url, json={"prompt": "x", "n_predict": 2})
    assert status == 200 and body["tokens_predicted"] == 2
    with pytest.raises(ValueError, match="needs a listener"):
        sim.set_fault("refuse")


async def test_huge_token_limits_are_clamped_not_a_crash(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=0.0)
    for limit in (2**64, 1e30, 10**30):
        async with sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": limit, "stream": True}) as r:
            assert r.status == 200
            first = await r.content.readline()
            assert first.startswith(b"data: ")
