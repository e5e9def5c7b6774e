"""Slot-aware routing against emulated llama-servers: spread, spill-over, the router's queue, affinity."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from olla.sim import SimServer
from tests.routerkit import CHAT, chat, ep, fast, post
from tests.simkit import until

LONG = 40  # tokens; at 10 ms each a request holds its slot for about 0.4 s


async def long_requests(client: TestClient, n: int, tokens: int = LONG) -> list[Any]:
    return list(await asyncio.gather(*(post(client, chat(tokens=tokens)) for _ in range(n))))


def waiting_on_backends(sims: list[SimServer]) -> int:
    return sum(s.waiting for s in sims)


async def test_concurrent_requests_spread_over_free_slots_and_never_wait_on_a_busy_endpoint(
    start_sims, make_router
) -> None:
    sims = await start_sims(*(fast(decode_ms=10.0) for _ in range(3)))
    client = await make_router([ep(f"e{i}", s) for i, s in enumerate(sims)])
    burst = asyncio.gather(*(post(client, chat(tokens=LONG)) for _ in range(6)))
    await until(lambda: sum(s.busy_slots for s in sims) == 6, 2.0)
    assert [s.busy_slots for s in sims] == [2, 2, 2]
    responses = await burst
    assert Counter(r.headers["X-Olla-Endpoint"] for r in responses) == {"e0": 2, "e1": 2, "e2": 2}


async def test_a_full_tier_spills_to_the_next_and_the_rest_wait_in_the_router(start_sims, make_router) -> None:
    hi, lo = await start_sims(fast(decode_ms=10.0), fast(decode_ms=10.0))
    client = await make_router([ep("hi", hi, 100), ep("lo", lo, 50)])
    burst = asyncio.gather(*(post(client, chat(tokens=LONG)) for _ in range(6)))
    queue = client.app.queue
    await until(lambda: hi.busy_slots == 2 and lo.busy_slots == 2, 2.0)
    waitlist = next(iter(queue.waitlists.values()))
    await until(lambda: len(waitlist.waiters) == 2, 1.0)
    assert waiting_on_backends([hi, lo]) == 0
    served = Counter(r.headers["X-Olla-Endpoint"] for r in await burst)
    assert served["hi"] >= 2 and served["lo"] >= 2 and sum(served.values()) == 6
    assert waitlist.waited == 2 and not waitlist.waiters


async def test_the_router_queue_is_first_in_first_out(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=5.0))
    client = await make_router([ep("only", sim)])
    order: list[int] = []

    async def one(i: int) -> None:
        r = await post(client, chat(tokens=10))
        assert r.status == 200
        order.append(i)

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(0.01)  # arrival order
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_full_queue_and_a_long_wait_answer_503_slots_exhausted(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("only", sim)], proxy={"queue": {"max_size": 1, "timeout": "300ms"}})
    busy = asyncio.create_task(post(client, chat(tokens=100)))  # holds the only slot for about 1 s
    await until(lambda: sim.busy_slots == 1, 1.0)
    queued = asyncio.create_task(post(client, chat()))
    await until(lambda: sum(len(w.waiters) for w in client.app.queue.waitlists.values()) == 1, 1.0)
    full = await post(client, chat())
    assert full.status == 503 and full.headers["Retry-After"]
    assert await full.json() == {"error": {"code": "slots_exhausted", "message": "All slots are busy. Please try again later.",
                                           "type": "server_error"}}  # fmt: skip
    started = time.monotonic()
    timed_out = await queued
    assert timed_out.status == 503 and (await timed_out.json())["error"]["code"] == "slots_exhausted"
    assert time.monotonic() - started < 0.5
    assert (await busy).status == 200
    metrics = await (await client.get("/metrics")).text()
    assert f'olla_queue_rejected_total{{model="{CHAT}",reason="full"}} 1.0' in metrics
    assert f'olla_queue_rejected_total{{model="{CHAT}",reason="timeout"}} 1.0' in metrics


async def test_a_client_that_leaves_while_queued_is_dropped_from_the_queue(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("only", sim)])
    busy = asyncio.create_task(post(client, chat(tokens=30)))
    await until(lambda: sim.busy_slots == 1, 1.0)
    leaver = asyncio.create_task(post(client, chat(tokens=30)))
    waitlists = client.app.queue.waitlists
    await until(lambda: sum(len(w.waiters) for w in waitlists.values()) == 1, 1.0)
    leaver.cancel()
    await until(lambda: sum(len(w.waiters) for w in waitlists.values()) == 0, 1.0)
    assert (await busy).status == 200
    await until(lambda: client.app.registry.endpoints["only"].slots.own == 0, 1.0)  # once its hold is over
    assert sim.busy_slots == 0
    models = await (await client.get("/internal/status/models")).json()
    assert models["models"][0]["queue"]["length"] == 0


# --- affinity ---------------------------------------------------------------------


SYSTEM = {"role": "system", "content": "You are a helpful assistant. " * 20}


def turn(history: list[dict[str, str]], text: str, tokens: int = 4) -> dict[str, Any]:
    return {"model": CHAT, "messages": [SYSTEM, *history, {"role": "user", "content": text}], "max_tokens": tokens}


async def converse(client: TestClient, history: list[dict[str, str]], text: str) -> tuple[Any, dict[str, Any]]:
    r = await post(client, turn(history, text))
    body = await r.json()
    history += [{"role": "user", "content": text}, body["choices"][0]["message"]]
    return r, body


async def test_the_next_turn_goes_where_the_conversation_is_cached(start_sims, make_router) -> None:
    sims = await start_sims(*(fast(slots=2) for _ in range(3)))
    client = await make_router([ep(f"e{i}", s) for i, s in enumerate(sims)])
    history: list[dict[str, str]] = []
    first, _ = await converse(client, history, "Tell me about slots.")
    assert first.headers["X-Olla-Affinity"] == "miss"
    home = first.headers["X-Olla-Endpoint"]
    for text in ("And then?", "Thanks."):
        r, body = await converse(client, history, text)
        assert (r.headers["X-Olla-Endpoint"], r.headers["X-Olla-Affinity"]) == (home, "hit")
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_a_full_home_loses_the_conversation_to_free_slots(start_sims, make_router) -> None:
    sims = await start_sims(fast(slots=1, decode_ms=10.0), fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("a", sims[0]), ep("b", sims[1])])
    history: list[dict[str, str]] = []
    first, _ = await converse(client, history, "Hello")
    home = first.headers["X-Olla-Endpoint"]
    home_sim = sims[0] if home == "a" else sims[1]
    blocker = asyncio.create_task(post(client, turn(history, "A long answer, please.", tokens=100)))
    await until(lambda: home_sim.busy_slots == 1, 1.0)  # the same conversation went home and fills it
    r, _ = await converse(client, history, "Still there?")
    assert r.headers["X-Olla-Affinity"] == "moved" and r.headers["X-Olla-Endpoint"] != home
    assert (await blocker).headers["X-Olla-Affinity"] == "hit"


@pytest.mark.parametrize("hold", ["500ms", "0s"])
async def test_the_next_turn_gets_its_conversations_slot_before_the_queue(start_sims, make_router, hold) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("only", sim)], proxy={"affinity": {"hold": hold}})
    mine: list[dict[str, str]] = []
    await converse(client, mine, "Hello.")
    assert not client.app.queue.holds  # a first turn looks like a one-shot prompt: nothing kept for it
    first = asyncio.create_task(converse(client, mine, "Tell me a story about slots. " * 10))
    await until(lambda: sim.busy_slots == 1, 1.0)
    other = asyncio.create_task(post(client, turn([], "Something else entirely, at length. " * 10)))
    await until(lambda: sum(len(w.waiters) for w in client.app.queue.waitlists.values()) == 1, 1.0)
    _, body = await first
    cached_before = body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] - 1
    r, body = await converse(client, mine, "Go on.")  # sent as soon as the first turn ended
    cached = body["usage"]["prompt_tokens_details"]["cached_tokens"]
    await other
    if hold == "0s":  # the waiting request took the slot: the previous turn's 290-character message is processed again
        assert cached_before - cached > 200
    else:
        assert r.headers["X-Olla-Affinity"] == "hit" and cached >= cached_before
        assert client.app.queue.holds_taken == 1


async def test_slots_busy_with_other_clients_are_seen_through_slots(start_sims, make_router, sim_session) -> None:
    sims = await start_sims(fast(slots=1, decode_ms=10.0), fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("a", sims[0]), ep("b", sims[1])], discovery={"slots_interval": "1s"})
    a = client.app.registry.endpoints["a"]
    outsider = asyncio.create_task(sim_session.post(sims[0].url + "/completion", json={"prompt": "x", "n_predict": 300}))
    await until(lambda: a.slots.busy == 1, 5.0)  # reconciled from two readings of a's /slots
    assert (a.slots.own, a.slots.external, a.slots.source) == (0, 1, "slots")
    for _ in range(3):
        r = await post(client, chat())
        assert r.headers["X-Olla-Endpoint"] == "b"
    assert sims[0].waiting == 0
    outsider.cancel()


async def test_a_wait_on_other_clients_load_reads_slots_again_soon(start_sims, make_router, sim_session) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=10.0))
    client = await make_router([ep("only", sim)], discovery={"slots_interval": "3s"})
    only = client.app.registry.endpoints["only"]
    outsider = asyncio.create_task(sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 2000}))
    await until(lambda: only.slots.external == 1, 10.0)  # two readings 3 s apart
    outsider.cancel()
    await until(lambda: sim.busy_slots == 0, 1.0)
    loop = asyncio.get_running_loop()
    queued = loop.time()
    r = await post(client, chat())  # waits in the router: the last reading still shows the outsider
    assert r.status == 200
    # The next reading comes 1 s after the last one, not at the 3 s interval.
    assert loop.time() - queued < 2.0


async def test_an_explicit_session_id_keeps_requests_together(start_sims, make_router) -> None:
    sims = await start_sims(*(fast(slots=4) for _ in range(3)))
    client = await make_router([ep(f"e{i}", s) for i, s in enumerate(sims)])
    served = set()
    for i in range(6):
        r = await post(client, chat(), headers={"X-Olla-Session-ID": "user-42"})
        served.add(r.headers["X-Olla-Endpoint"])
        assert r.headers["X-Olla-Affinity"] == ("miss" if i == 0 else "hit")
    assert len(served) == 1


async def test_the_affinity_map_stays_within_max_entries(start_sims, make_router) -> None:
    sims = await start_sims(fast(slots=4), fast(slots=4))
    client = await make_router([ep("a", sims[0]), ep("b", sims[1])], proxy={"affinity": {"max_entries": 2}})
    histories: list[list[dict[str, str]]] = [[] for _ in range(3)]
    for i, history in enumerate(histories):
        await converse(client, history, f"conversation {i}")
    remembered = client.app.proxy.affinity
    assert remembered is not None and len(remembered) == 2
    newest, _ = await converse(client, histories[2], "next")
    oldest, _ = await converse(client, histories[0], "next")
    assert newest.headers["X-Olla-Affinity"] == "hit"
    assert oldest.headers["X-Olla-Affinity"] == "miss"  # evicted: only two conversations fit
    assert len(remembered) == 2


async def test_status_and_metrics_show_slots_and_queues(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast(slots=2, decode_ms=10.0))
    client = await make_router([ep("only", sim)])
    burst = asyncio.gather(*(post(client, chat(tokens=20)) for _ in range(3)))
    await until(lambda: sim.busy_slots == 2, 1.0)
    view = (await (await client.get("/internal/status/endpoints")).json())["endpoints"][0]
    assert (view["total_slots"], view["busy_slots"], view["slots_source"]) == (2, 2, "router")
    metrics = await (await client.get("/metrics")).text()
    assert 'olla_endpoint_busy_slots{endpoint="only"} 2.0' in metrics
    assert f'olla_queue_length{{model="{CHAT}"}} 1.0' in metrics
    await burst
    models = (await (await client.get("/internal/status/models")).json())["models"]
    assert models[0]["queue"]["waited"] == 1 and models[0]["queue"]["mean_wait_ms"] > 0
    assert orjson.loads(orjson.dumps(models))  # JSON all the way down


async def test_affinity_belongs_to_slot_aware_only(start_sims, make_router) -> None:
    (sim,) = await start_sims(fast())
    client = await make_router([ep("only", sim)], proxy={"load_balancer": "least-connections"})
    r = await post(client, chat(), headers={"X-Olla-Session-ID": "s"})
    assert r.status == 200 and "X-Olla-Affinity" not in r.headers
