"""Slots, queueing, prompt caching, token timing and disconnects of the emulated llama-server.

Timing assertions are causal or lower bounds (a sleep never ends early), so a
loaded machine makes these tests slower, not flaky.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import orjson

from olla.sim.promptcache import PromptCache
from olla.sim.slots import Slot, SlotPool, choose
from tests.simkit import until

async def data_events(response: aiohttp.ClientResponse, count: int) -> list[float]:
    """Read `count` SSE data events; the time each arrived."""
    times = []
    async for line in response.content:
        if line.startswith(b"data: "):
            times.append(time.monotonic())
            if len(times) == count:
                break
    return times


# --- the pure pool -----------------------------------------------------------------


def test_choice_prefers_the_longest_shared_prefix_then_the_least_recently_used() -> None:
    a, b, c = Slot(0, cache=[1, 5, 6, 7], last_used=3), Slot(1, cache=[1, 5, 9], last_used=1), Slot(2, last_used=2)
    assert choose([a, b, c], [1, 5, 6, 7, 8], similarity=0.1) is a
    assert choose([a, b, c], [1, 5, 9, 9], similarity=0.1) is b
    assert choose([a, b, c], [2, 2, 2], similarity=0.1) is b  # nothing shared: least recently used
    assert choose([a, b, c], [1, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9], similarity=0.1) is b  # 1/11 is below 10 %
    a.busy = True
    assert choose([a, b, c], [1, 5, 6, 7, 8], similarity=0.1) is b
    assert choose([a, b, c], [1, 5, 6, 7, 8], similarity=0.1, pinned=0) is None
    assert choose([a, b, c], [1], similarity=0.1, pinned=5) is c  # pinned ids wrap around


async def test_the_pool_serves_waiters_in_arrival_order_and_forgets_the_cancelled() -> None:
    pool = SlotPool(1)
    held = await pool.acquire([1, 2])
    order: list[int] = []

    async def wait(i: int) -> None:
        slot = await pool.acquire([1, 2, i])
        order.append(i)
        pool.release(slot)

    waiters = [asyncio.create_task(wait(i)) for i in range(4)]
    await asyncio.sleep(0)
    assert pool.waiting == 4 and pool.busy == 1
    waiters[1].cancel()
    await asyncio.sleep(0)
    assert pool.waiting == 3
    pool.release(held)
    await asyncio.gather(*waiters, return_exceptions=True)
    assert order == [0, 2, 3] and pool.waiting == 0 and pool.busy == 0


# --- queueing over HTTP ------------------------------------------------------------


async def test_two_slots_serve_six_requests_in_three_waves_and_queued_ones_get_no_headers(
    start_sim, sim_session
) -> None:
    sim = await start_sim(slots=2, decode_ms=40.0)
    started = time.monotonic()
    headers_at: list[float] = []

    async def one(i: int) -> tuple[int, float]:
        body = {"prompt": f"wave {i}", "n_predict": 4, "stream": True}
        async with sim_session.post(sim.url + "/completion", json=body) as r:
            headers_at.append(time.monotonic() - started)
            await r.read()
            return r.status, time.monotonic() - started

    requests = asyncio.gather(*(one(i) for i in range(6)))
    await until(lambda: sim.busy_slots == 2 and sim.waiting == 4)
    results = await requests
    assert [status for status, _ in results] == [200] * 6
    finished = sorted(t for _, t in results)
    wave = finished[1]
    # Each pair finishes together; the next pair only after it.
    assert finished[2] > finished[1] + 0.4 * wave, finished
    assert finished[4] > finished[3] + 0.4 * wave, finished
    # A queued request's status line only comes once a slot has freed up.
    assert sorted(headers_at)[1] < finished[0] <= sorted(headers_at)[2], (headers_at, finished)
    assert finished[2] <= sorted(headers_at)[4], (headers_at, finished)


async def test_extending_a_prompt_reuses_the_slot_cache(start_sim, sim_session) -> None:
    sim = await start_sim(slots=2, prefill_ms=1.0)
    history = "You are a terse assistant. " * 8
    async with sim_session.post(sim.url + "/completion", json={"prompt": history, "n_predict": 2}) as r:
        first = (await r.json())["timings"]
    async with sim_session.post(sim.url + "/completion", json={"prompt": history + "More.", "n_predict": 2}) as r:
        second = (await r.json())["timings"]
    assert first["cache_n"] == 0 and first["prompt_n"] == len(history) + 1
    assert second["cache_n"] == len(history) + 1 and second["prompt_n"] == len("More.")
    assert second["prompt_ms"] < first["prompt_ms"]
    assert first["prompt_ms"] >= len(history)  # 1 ms per uncached token, never less


async def test_a_repeated_chat_is_cached_but_for_one_token(start_sim, sim_session) -> None:
    sim = await start_sim(slots=2)
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    async with sim_session.post(sim.url + "/v1/chat/completions", json=body) as r:
        first = (await r.json())["usage"]
    async with sim_session.post(sim.url + "/v1/chat/completions", json=body) as r:
        second = (await r.json())["usage"]
    assert first["prompt_tokens_details"]["cached_tokens"] == 0
    assert second["prompt_tokens_details"]["cached_tokens"] == second["prompt_tokens"] - 1
    async with sim_session.post(sim.url + "/v1/chat/completions", json={**body, "cache_prompt": False}) as r:
        assert (await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


async def test_streamed_tokens_arrive_as_they_are_produced(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=50.0)
    async with sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 6, "stream": True}) as r:
        times = await data_events(r, 7)
    tokens = times[:6]
    assert tokens == sorted(tokens)
    # Five 50 ms gaps at least separate the first token from the last.
    assert tokens[-1] - tokens[0] >= 0.5 * 5 * 0.050, times


async def test_a_busy_server_fails_the_no_slot_probe_and_counts_the_deferred(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, decode_ms=20.0)
    long = asyncio.create_task(sim_session.post(sim.url + "/completion", json={"prompt": "a", "n_predict": 50}))
    queued = asyncio.create_task(sim_session.post(sim.url + "/completion", json={"prompt": "b", "n_predict": 1}))
    await until(lambda: sim.busy_slots == 1 and sim.waiting == 1)
    async with sim_session.get(sim.url + "/slots?fail_on_no_slot=1") as r:
        assert r.status == 503
        assert await r.json() == {"error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}}
    async with sim_session.get(sim.url + "/slots") as r:
        assert (await r.json())[0]["is_processing"] is True
    async with sim_session.get(sim.url + "/metrics") as r:
        text = await r.text()
    assert "llamacpp:requests_processing 1\n" in text and "llamacpp:requests_deferred 1\n" in text
    for task in (long, queued):
        response = await task
        assert response.status == 200
        response.release()
    async with sim_session.get(sim.url + "/slots?fail_on_no_slot=1") as r:
        assert r.status == 200


async def test_a_pinned_slot_is_waited_for_even_when_another_is_idle(start_sim, sim_session) -> None:
    sim = await start_sim(slots=2, decode_ms=20.0)
    pinned = {"prompt": "a", "n_predict": 10, "id_slot": 0}
    first = asyncio.create_task(sim_session.post(sim.url + "/completion", json=pinned))
    await until(lambda: sim.busy_slots == 1)
    async with sim_session.post(sim.url + "/completion", json={"prompt": "b", "n_predict": 1, "id_slot": 2}) as r:
        assert (await r.json())["id_slot"] == 0
    assert first.done()
    (await first).release()


# --- clients that leave ------------------------------------------------------------


async def test_a_client_leaving_mid_stream_frees_its_slot_at_once(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, decode_ms=20.0)
    r = await sim_session.post(
        sim.url + "/v1/chat/completions", json={"messages": [], "max_tokens": 500, "stream": True}
    )
    await data_events(r, 3)
    assert sim.busy_slots == 1
    r.close()
    assert await until(lambda: sim.busy_slots == 0) < 0.1


async def test_a_client_leaving_while_queued_gives_up_its_place_at_once(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, decode_ms=20.0)
    holder = await sim_session.post(sim.url + "/completion", json={"prompt": "a", "n_predict": 500, "stream": True})
    queued = asyncio.create_task(sim_session.post(sim.url + "/completion", json={"prompt": "b", "n_predict": 1}))
    await until(lambda: sim.waiting == 1)
    queued.cancel()
    assert await until(lambda: sim.waiting == 0) < 0.1
    assert sim.busy_slots == 1
    holder.close()
    await until(lambda: sim.busy_slots == 0)


async def test_a_client_leaving_during_prefill_frees_its_slot_at_once(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, prefill_ms=10.0)
    request = asyncio.create_task(sim_session.post(sim.url + "/completion", json={"prompt": "x" * 500, "n_predict": 1}))
    await until(lambda: sim.busy_slots == 1)
    request.cancel()
    assert await until(lambda: sim.busy_slots == 0) < 0.1


# --- the RAM prompt cache ----------------------------------------------------------

CONVERSATION_A = "Conversation A about slots. " * 40  # the prompts measured on a real llama-server
CONVERSATION_B = "Totally different text about queues and routers. " * 30


def test_the_prompt_cache_keeps_what_it_does_not_hold_and_drops_the_oldest_past_its_limit() -> None:
    cache = PromptCache(limit=10)
    cache.save([1, 2, 3])
    cache.save([1, 2])  # already held as the start of an entry
    cache.save([1, 2, 3, 4])  # extends an entry, which goes
    assert cache.entries == [[1, 2, 3, 4]]
    cache.save([5, 6, 7, 8])
    cache.save([9, 9, 9])  # 11 tokens: the oldest goes
    assert cache.entries == [[5, 6, 7, 8], [9, 9, 9]] and cache.n_tokens == 7
    cache.save(list(range(20)))  # larger than the limit: kept alone, as the newest always is
    assert cache.entries == [list(range(20))]


def test_the_prompt_cache_gives_out_the_best_entry_once_and_never_trashes_a_large_one() -> None:
    cache = PromptCache(limit=1000)
    cache.save([1, 2, 3, 4])
    cache.save([7] * 20)
    assert cache.load(held=[9, 9], prompt=[1, 2, 3, 5]) == [1, 2, 3, 4]
    assert cache.load(held=[9, 9], prompt=[1, 2, 3, 5]) is None  # restored into the slot, so gone
    assert cache.load(held=[9, 9], prompt=[7] * 4 + [8]) is None  # would keep 4 of its 20 tokens
    assert cache.load(held=[7] * 6, prompt=[7] * 6 + [8]) is None  # the slot already holds as much
    assert cache.load(held=[9], prompt=[7] * 6 + [8]) == [7] * 20


async def post_timings(session: aiohttp.ClientSession, url: str, prompt: str) -> dict[str, float]:
    async with session.post(url + "/completion", json={"prompt": prompt, "n_predict": 2}) as r:
        assert r.status == 200
        return (await r.json())["timings"]


async def test_a_conversation_finds_its_prompt_again_after_another_took_the_only_slot(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, prefill_ms=0.0)
    a = await post_timings(sim_session, sim.url, CONVERSATION_A)
    b = await post_timings(sim_session, sim.url, CONVERSATION_B)
    a_next = await post_timings(sim_session, sim.url, CONVERSATION_A + " next turn")
    b_next = await post_timings(sim_session, sim.url, CONVERSATION_B + " more")
    assert a["cache_n"] == 0 and b["cache_n"] <= 1  # only <s> in common
    # As measured on llama-server -np 1: cache_n 1082 and 1412 after 1082- and 1410-token prompts.
    assert a_next["cache_n"] >= a["prompt_n"] and a_next["prompt_n"] <= len(" next turn")
    assert b_next["cache_n"] >= b["prompt_n"] and b_next["prompt_n"] <= len(" more")


async def test_without_a_prompt_cache_the_returning_conversation_is_processed_again(start_sim, sim_session) -> None:
    sim = await start_sim(slots=1, prefill_ms=0.0, cache_ram_tokens=0)
    a = await post_timings(sim_session, sim.url, CONVERSATION_A)
    await post_timings(sim_session, sim.url, CONVERSATION_B)
    a_next = await post_timings(sim_session, sim.url, CONVERSATION_A + " next turn")
    assert a_next["cache_n"] <= 1 and a_next["prompt_n"] > a["prompt_n"]


async def test_restoring_from_the_prompt_cache_costs_its_share_of_prefill_before_the_prompt(
    start_sim, sim_session
) -> None:
    sim = await start_sim(slots=1, prefill_ms=0.5, cache_load_fraction=0.5)
    a, b = "a" * 400, "b" * 400
    for prompt in (a, b):
        await post_timings(sim_session, sim.url, prompt)
    started = time.monotonic()
    a_next = await post_timings(sim_session, sim.url, a + "!")
    elapsed = time.monotonic() - started
    assert a_next["cache_n"] >= 400 and a_next["prompt_n"] == 1
    # The 402 restored tokens cost 0.5 x 0.5 ms each, about 100 ms; without a cost the request takes 1 ms.
    assert elapsed >= 0.5 * 0.5 * 402 / 1000
