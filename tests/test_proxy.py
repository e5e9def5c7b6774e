"""The router against emulated llama.cpp servers: tiers, balancers, failover, errors, streaming, status."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from olla.upstream import STALE
from tests.routerkit import CHAT, chat, ep, fake_endpoint, fast, post, wait_until
from tests.simkit import until


# --- tiers and balancers ----------------------------------------------------------


async def test_the_best_priority_tier_takes_every_request_then_spills_when_down(start_sims, make_router) -> None:
    hi, lo = await start_sims(fast(), fast())
    client = await make_router([ep("hi", hi, 100), ep("lo", lo, 50)])
    served = [(await post(client, chat())).headers["X-Olla-Endpoint"] for _ in range(4)]
    assert served == ["hi"] * 4
    hi.set_fault("crash")
    r = await post(client, chat())
    assert r.status == 200 and r.headers["X-Olla-Endpoint"] == "lo"
    assert r.headers["X-Olla-Routing-Decision"] == "fallback"
    assert (await post(client, chat())).headers["X-Olla-Endpoint"] == "lo"


async def test_round_robin_alternates_inside_the_tier(start_sims, make_router) -> None:
    a, b, c = await start_sims(fast(), fast(), fast())
    client = await make_router([ep("a", a), ep("b", b), ep("c", c, 10)], proxy={"load_balancer": "round-robin"})
    served = [(await post(client, chat())).headers["X-Olla-Endpoint"] for _ in range(6)]
    assert served == ["a", "b"] * 3


async def test_least_connections_sends_concurrent_requests_to_the_idlest(start_sims, make_router) -> None:
    a, b = await start_sims(fast(decode_ms=20.0, slots=4), fast(decode_ms=20.0, slots=4))
    client = await make_router([ep("a", a), ep("b", b)], proxy={"load_balancer": "least-connections"})
    responses = await asyncio.gather(*(post(client, chat(tokens=10)) for _ in range(8)))
    assert Counter(r.headers["X-Olla-Endpoint"] for r in responses) == {"a": 4, "b": 4}


async def test_priority_balancer_spreads_over_the_top_tier_only(start_sims, make_router) -> None:
    a, b, c = await start_sims(fast(), fast(), fast())
    client = await make_router([ep("a", a), ep("b", b), ep("c", c, 1)], proxy={"load_balancer": "priority"})
    served = Counter([(await post(client, chat())).headers["X-Olla-Endpoint"] for _ in range(40)])
    assert set(served) == {"a", "b"} and min(served.values()) >= 5


# --- failover -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "params", "state"),
    [
        ("refuse", {}, "offline"),
        ("crash", {}, "offline"),
        ("status", {"status": 502}, "unhealthy"),
        ("status", {"status": 503}, "unhealthy"),
        ("status", {"status": 504}, "unhealthy"),
        ("loading", {}, "unhealthy"),
    ],
)
async def test_failures_before_headers_fail_over_and_eject(start_sims, make_router, fault, params, state) -> None:
    a, b = await start_sims(fast(), fast())
    client = await make_router([ep("a", a), ep("b", b)], proxy={"load_balancer": "round-robin"})
    a.set_fault(fault, **params)
    for _ in range(3):
        r = await post(client, chat())
        assert r.status == 200 and r.headers["X-Olla-Endpoint"] == "b"
    endpoints = await (await client.get("/internal/status/endpoints")).json()
    a_view = next(e for e in endpoints["endpoints"] if e["name"] == "a")
    assert a_view["status"] in (state, "offline", "loading")
    assert a_view["errors"] >= 1
    metrics = await (await client.get("/metrics")).text()
    assert 'olla_retries_total{endpoint="a"' in metrics


async def test_a_500_or_400_is_the_requests_own_error_and_passes_through(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)])
    a.set_fault("status", status=500, message="boom")
    r = await post(client, chat())
    assert r.status == 500 and (await r.json())["error"]["message"] == "boom"
    a.clear_faults()
    too_long = {"model": CHAT, "prompt": "x" * 5000, "max_tokens": 1}
    r = await post(client, too_long, "/olla/llamacpp/v1/completions")
    assert r.status == 400 and (await r.json())["error"]["type"] == "exceed_context_size_error"
    assert client.app.registry.endpoints["a"].routable


async def test_breaker_ejection_ends_with_the_next_good_probe(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)])
    registry = client.app.registry
    a.set_fault("status", status=503)
    r = await post(client, chat())
    error = (await r.json())["error"]
    assert r.status == 503 and error["code"] == "no_healthy_endpoint" and r.headers["Retry-After"]
    assert "endpoint a answered 503" in error["message"]
    assert not registry.endpoints["a"].routable
    r = await post(client, chat())
    assert r.status == 503 and (await r.json())["error"]["code"] == "no_healthy_endpoint"
    assert r.headers["Retry-After"]
    a.clear_faults()
    await wait_until(registry, lambda: registry.endpoints["a"].routable, timeout=5)
    assert (await post(client, chat())).status == 200


async def test_a_loading_endpoint_is_not_routed_until_it_has_loaded(start_sims, make_router) -> None:
    ready, loading = await start_sims(fast(), fast(load_seconds=1.0))
    client = await make_router([ep("ready", ready, 10), ep("loading", loading, 100)], ready=1)
    registry = client.app.registry
    assert registry.endpoints["loading"].health.value == "loading"
    assert (await post(client, chat())).headers["X-Olla-Endpoint"] == "ready"
    loaded = registry.endpoints["loading"]
    await wait_until(registry, lambda: loaded.routable and loaded.discovery is not None, timeout=5)
    assert (await post(client, chat())).headers["X-Olla-Endpoint"] == "loading"


@pytest.mark.parametrize("fault", ["crash", "refuse"])
async def test_every_endpoint_down_answers_503_at_once(start_sims, make_router, fault) -> None:
    a, b = await start_sims(fast(), fast())
    client = await make_router([ep("a", a), ep("b", b)])
    a.set_fault(fault)
    b.set_fault(fault)
    started = time.monotonic()
    # The first request finds out by trying each endpoint; the next one is told at once.
    first, second = [await post(client, chat()) for _ in range(2)]
    elapsed = time.monotonic() - started
    for r in (first, second):
        error = (await r.json())["error"]
        assert r.status == 503 and error["code"] == "no_healthy_endpoint" and r.headers["Retry-After"] == "5"
        assert "a=offline" in error["message"] and "b=offline" in error["message"]
    tried = (await first.json())["error"]["message"]
    assert "every attempt failed: endpoint a" in tried and "; endpoint b" in tried
    assert first.headers["X-Olla-Routing-Reason"] == "all_attempts_failed"
    assert elapsed < 0.5, elapsed


async def test_a_request_that_finds_no_endpoint_ends_an_offline_endpoints_probe_backoff(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a, check_interval="200ms")])
    endpoint = client.app.registry.endpoints["a"]
    a.set_fault("refuse")
    await until(lambda: endpoint.next_probe_in() >= 3.2, 10.0)  # 0.2 s doubled after each failed probe
    a.clear_faults()
    assert (await post(client, chat())).status == 503  # the router still knows it as offline
    asked = time.monotonic()
    await until(lambda: endpoint.routable, 5.0)
    assert time.monotonic() - asked < 1.5  # a probe at once, one more to confirm; not 3.2 s of backoff


async def test_an_attempt_limit_that_leaves_a_healthy_endpoint_keeps_the_attempts_own_error(
    start_sims, make_router
) -> None:
    a, b = await start_sims(fast(), fast())
    client = await make_router([ep("a", a), ep("b", b)], proxy={"load_balancer": "round-robin",
                                                                "retry": {"enabled": False}})  # fmt: skip
    a.set_fault("refuse")
    r = await post(client, chat())  # round-robin tries a first; the one attempt allowed leaves b healthy
    assert r.status == 502 and (await r.json())["error"]["code"] == "backend_unreachable"
    assert (await post(client, chat())).headers["X-Olla-Endpoint"] == "b"


async def test_a_stream_cut_midway_ends_with_an_sse_error_event(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(decode_ms=5.0))
    client = await make_router([ep("a", a)])
    a.set_fault("cut_stream", after=3)
    r = await client.post("/olla/llamacpp/v1/chat/completions", json=chat(tokens=20, stream=True))
    assert r.status == 200
    events = [e for e in (await r.text()).split("\n\n") if e]
    assert len(events) >= 2
    last = orjson.loads(events[-1].removeprefix("data: "))
    assert last["error"]["code"] == "upstream_stream_broken"
    assert "[DONE]" not in events[-1]


async def test_silence_longer_than_read_timeout_closes_the_stream_and_frees_the_slot(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(decode_ms=5.0))
    client = await make_router([ep("a", a)], proxy={"read_timeout": "300ms"})
    a.set_fault("hang_stream", after=2)
    r = await client.post("/olla/llamacpp/v1/chat/completions", json=chat(tokens=20, stream=True))
    text = await r.text()
    assert "read_timeout" in text and "upstream_stream_broken" in text
    await until(lambda: a.busy_slots == 0, 1.0)


# --- models, errors, limits -----------------------------------------------------------


async def test_models_and_aliases_route_to_their_endpoints(start_sims, make_router) -> None:
    chat_sim, code_sim = await start_sims(fast(CHAT), fast("/models/coder-q4.gguf"))
    client = await make_router([ep("chat", chat_sim), ep("code", code_sim)], model_aliases={"assistant": [CHAT]})
    assert (await post(client, chat("assistant"))).headers["X-Olla-Endpoint"] == "chat"
    r = await post(client, {"model": "coder-q4.gguf", "prompt": "x", "max_tokens": 1}, "/olla/llamacpp/v1/completions")
    assert r.headers["X-Olla-Endpoint"] == "code" and r.headers["X-Olla-Model"] == "coder-q4.gguf"
    r = await post(client, {"content": "abc"}, "/olla/llamacpp/tokenize", headers={"X-Olla-Model": CHAT})
    assert r.headers["X-Olla-Endpoint"] == "chat"
    listed = await (await client.get("/olla/llamacpp/v1/models")).json()
    assert {m["id"] for m in listed["data"]} == {CHAT, "/models/coder-q4.gguf", "assistant"}


async def test_router_errors_are_openai_shaped_with_a_request_id(start_sims, make_router) -> None:
    a, b = await start_sims(fast(CHAT), fast("other"))
    client = await make_router([ep("a", a), ep("b", b)], server={"request_limits": {"max_body_size": 1024}})
    cases = [
        (await client.get("/olla/llamacpp/slots"), 404, "not_found"),
        (await client.get("/olla/llamacpp/v1/chat/completions"), 405, "method_not_allowed"),
        (await client.post("/olla/llamacpp/v1/chat/completions", data=b"{nope"), 400, "invalid_json"),
        (await client.post("/olla/llamacpp/tokenize", json={"content": "x"}), 400, "model_required"),
        (await client.post("/olla/llamacpp/v1/chat/completions", json=chat("ghost")), 404, "model_not_found"),
        (await client.post("/olla/llamacpp/v1/chat/completions", data=b"x" * 2048), 413, "request_too_large"),
        (await client.get("/nowhere"), 404, "not_found"),
    ]
    for response, status, code in cases:
        body = await response.json()
        assert (response.status, body["error"]["code"]) == (status, code), body
        assert set(body["error"]) == {"message", "type", "code"} and body["error"]["message"]
        assert response.headers["X-Olla-Request-Id"]
    assert "ghost" in (await cases[4][0].json())["error"]["message"]


async def test_a_chunked_body_over_the_limit_is_refused_while_reading(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"request_limits": {"max_body_size": 1024}})

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    r = await client.post("/olla/llamacpp/v1/chat/completions", data=chunks())
    assert r.status == 413 and (await r.json())["error"]["code"] == "request_too_large"


# --- streaming and disconnects ----------------------------------------------------


async def test_streamed_tokens_reach_the_client_as_they_are_produced(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(decode_ms=40.0))
    client = await make_router([ep("a", a)])
    loop = asyncio.get_running_loop()
    arrivals: list[float] = []
    r = await client.post("/olla/llamacpp/completion", json={"prompt": "x", "n_predict": 8, "stream": True})
    async for line in r.content:
        if line.startswith(b"data: "):
            arrivals.append(loop.time())
    assert len(arrivals) == 8 + 1  # eight tokens and the final stop event
    # The first token arrives long before the last one is produced: nothing is buffered.
    assert arrivals[-1] - arrivals[0] > 0.5 * 7 * 0.040
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:-1])]
    assert sum(g > 0.010 for g in gaps) >= 5


async def test_a_client_leaving_mid_stream_frees_the_slot_at_once(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(decode_ms=20.0))
    client = await make_router([ep("a", a)])
    r = await client.post("/olla/llamacpp/v1/chat/completions", json=chat(tokens=200, stream=True))
    await r.content.readline()
    assert a.busy_slots == 1
    r.close()
    assert await until(lambda: a.busy_slots == 0, 1.0) < 0.1


async def test_a_client_leaving_a_non_streaming_generation_frees_the_slot(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(decode_ms=20.0))
    client = await make_router([ep("a", a)])
    task = asyncio.create_task(client.post("/olla/llamacpp/v1/chat/completions", json=chat(tokens=200)))
    await until(lambda: a.busy_slots == 1, 2.0)
    task.cancel()
    assert await until(lambda: a.busy_slots == 0, 1.0) < 0.1


# --- what reaches the endpoint ----------------------------------------------------------


async def test_forwarded_headers_drop_hop_by_hop_and_client_credentials(aiohttp_server, make_router) -> None:
    seen: dict[str, str] = {}

    async def tokenize(request: web.Request) -> web.Response:
        seen.update(request.headers)
        seen["body"] = (await request.read()).decode()
        seen["query"] = request.query_string
        return web.json_response({"tokens": [1]}, headers={"Connection": "keep-alive", "X-Olla-Endpoint": "spoof"})

    url = await fake_endpoint(aiohttp_server, tokenize)
    client = await make_router([{"name": "fake", "url": url, "headers": {"Authorization": "Bearer backend-key"}}])
    raw = b'{"content":  "keep   my spacing", "model": "chat-model"}'
    r = await client.post("/olla/llamacpp/tokenize?with_pieces=true", data=raw, headers={
        "Authorization": "Bearer client-secret", "X-Api-Key": "client-key", "Cookie": "c=1",
        "X-Conversation-Id": "conv", "Keep-Alive": "timeout=5", "X-Custom": "kept",
        "Content-Type": "application/json", "X-Request-Id": "req-42",
    })  # fmt: skip
    assert r.status == 200
    assert seen["body"] == raw.decode() and seen["query"] == "with_pieces=true"
    assert seen["Authorization"] == "Bearer backend-key"
    assert "X-Api-Key" not in seen and "Cookie" not in seen and "X-Conversation-Id" not in seen
    assert "Keep-Alive" not in seen and seen["X-Custom"] == "kept"
    assert seen["X-Forwarded-For"] == "127.0.0.1" and seen["X-Forwarded-Proto"] == "http"
    assert r.headers["X-Olla-Endpoint"] == "fake" and r.headers["X-Olla-Request-Id"] == "req-42"


# --- status and metrics -------------------------------------------------------------


async def test_status_and_metrics_describe_the_fleet(start_sims, make_router) -> None:
    a, b = await start_sims(fast(slots=4), fast("other", slots=2))
    client = await make_router([ep("a", a), ep("b", b, 50)])
    assert (await post(client, chat())).status == 200
    status = await (await client.get("/internal/status")).json()
    assert status["endpoints"]["total"] == 2 and status["endpoints"]["healthy"] == 2
    assert status["requests"] == 1 and status["models"] == 2
    views = {e["name"]: e for e in (await (await client.get("/internal/status/endpoints")).json())["endpoints"]}
    assert views["a"]["total_slots"] == 4 and views["a"]["models"] == [CHAT] and views["a"]["status"] == "healthy"
    assert views["b"]["priority"] == 50 and views["a"]["url"].startswith("http://127.0.0.1:")
    models = await (await client.get("/olla/models")).json()
    assert {m["id"]: [e["name"] for e in m["endpoints"]] for m in models["models"]} == {CHAT: ["a"], "other": ["b"]}
    assert (await (await client.get("/internal/health")).json()) == {"status": "healthy"}
    metrics = await (await client.get("/metrics")).text()
    assert f'olla_requests_total{{code="200",endpoint="a",model="{CHAT}",route="/v1/chat/completions"}} 1.0' in metrics
    assert 'olla_endpoint_health{endpoint="a",olla_endpoint_health="healthy"} 1.0' in metrics
    assert 'olla_endpoint_slots{endpoint="a"} 4.0' in metrics
    assert "olla_upstream_ttfb_seconds_bucket" in metrics and "olla_health_check_duration_seconds_count" in metrics


async def test_one_access_log_line_per_request_with_its_facts(start_sims, make_router, access_lines) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)])
    await post(client, chat(), headers={"X-Request-Id": "abc-1"})
    await post(client, chat("ghost"))
    ok, missing = access_lines()
    facts = ("logger", "message", "request_id", "method", "path", "model", "endpoint", "status", "attempts")
    assert tuple(ok[k] for k in facts) == (
        "olla.access", "request", "abc-1", "POST", "/olla/llamacpp/v1/chat/completions", CHAT, "a", 200, 1)
    assert ok["bytes"] > 0 and ok["ms"] >= ok["ttfb_ms"] > 0
    assert (missing["status"], missing["endpoint"], missing["attempts"]) == (404, None, 0)


async def test_a_wrong_method_on_olla_s_own_routes_is_a_405_naming_the_allowed_ones(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)])
    r = await client.post("/internal/status", json={})
    body = await r.json()
    assert r.status == 405 and body["error"]["code"] == "method_not_allowed"
    assert "use GET" in body["error"]["message"] and "GET" in r.headers["Allow"]


async def test_silence_before_headers_fails_over_only_where_no_generation_can_be_running(
    aiohttp_server, start_sims, make_router
) -> None:
    async def stuck(request: web.Request) -> web.Response:
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    async def tokenize(request: web.Request) -> web.Response:
        return web.json_response({"tokens": [1, 2]})

    stuck_url = await fake_endpoint(aiohttp_server, stuck)
    good_url = await fake_endpoint(aiohttp_server, tokenize)
    client = await make_router([{"name": "stuck", "url": stuck_url, "priority": 100},
                                {"name": "good", "url": good_url, "priority": 50}],
                               proxy={"header_timeout": "300ms"})  # fmt: skip
    started = time.monotonic()
    r = await post(client, {"content": "x"}, "/olla/llamacpp/tokenize", headers={"X-Olla-Model": CHAT})
    assert r.status == 200 and r.headers["X-Olla-Endpoint"] == "good"
    assert r.headers["X-Olla-Routing-Decision"] == "fallback"
    assert 0.3 <= time.monotonic() - started < 2.0
    assert client.app.registry.endpoints["stuck"].health.value == "offline"


async def test_a_long_non_streaming_generation_is_not_cut_by_the_header_timeout(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast(decode_ms=20.0))
    client = await make_router([ep("only", sim)], proxy={"header_timeout": "200ms"})
    r = await post(client, chat(tokens=30))  # headers only after about 0.6 s, when the generation is done
    assert r.status == 200 and r.headers["X-Olla-Routing-Decision"] == "routed"


async def test_a_request_an_endpoint_dropped_while_it_waited_fails_over(start_sims, make_router) -> None:
    dropping, spare = await start_sims(fast(), fast())
    client = await make_router([ep("a-1", dropping, priority=200), ep("a-2", spare)], proxy={"response_timeout": "3s"})
    dropping.set_fault("hang_headers")
    request = asyncio.create_task(post(client, chat()))
    await until(lambda: len(dropping.state.active) == 1)
    await asyncio.sleep(STALE * 2)  # it waited there: not a pooled connection the endpoint had already closed
    (connection,) = dropping.state.active
    connection.abort()  # it reached the endpoint: sending it there again would run it twice
    response = await request
    assert response.status == 200 and response.headers["X-Olla-Endpoint"] == "a-2", await response.text()
