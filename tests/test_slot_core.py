"""Slot accounting, the slot-aware balancer and KV-cache affinity: pure logic, no I/O, no sleeps."""

from __future__ import annotations

import asyncio

from olla.affinity import BLOCK, AffinityMap, keys_for
from olla.balancer import SlotAware
from olla.config import EndpointConfig
from olla.endpoint import Endpoint, Health
from olla.metrics import Metrics
from olla.registry import Pool
from olla.slotqueue import MAX_OVERTAKEN, SlotQueue
from olla.slots import Slots


def endpoint(name: str, total: int, busy: int = 0, priority: int = 100) -> Endpoint:
    e = Endpoint(EndpointConfig(name=name, url=f"http://{name}:1", priority=priority))
    e.slots.reported = total
    e.slots.own = busy
    return e


# --- slots ------------------------------------------------------------------------


def test_total_slots_come_from_props_then_the_listing_then_config_then_the_default() -> None:
    s = Slots(default=4)
    assert s.total == 4
    s.configured = 3
    assert s.total == 3
    s.listed = 2
    assert s.total == 2
    s.reported = 8
    assert s.total == 8


def test_busy_is_own_claims_plus_what_others_keep_busy() -> None:
    s = Slots(reported=4)
    s.claim()
    s.claim()
    listing = [{"id": i, "is_processing": i < 3} for i in range(4)]
    assert s.reconcile(listing, own_before=2) is False
    assert s.external == 0  # one reading could be a slot just finishing a router request
    assert s.reconcile(listing, own_before=2) is False
    assert (s.own, s.external, s.busy, s.free, s.source) == (2, 1, 3, 1, "slots")
    s.release()
    s.release()
    assert s.reconcile([{"id": i, "is_processing": False} for i in range(4)], own_before=0) is True
    assert s.free == 4


def test_a_listing_taken_while_claims_changed_never_invents_external_load() -> None:
    s = Slots(reported=2)
    s.claim()  # one claim was added while /slots was read, which still saw only the old one
    s.claim()
    assert s.reconcile([{"is_processing": True}, {"is_processing": False}], own_before=1) is False
    assert s.external == 0


def test_a_slot_seen_busy_in_one_reading_only_is_churn_not_load() -> None:
    s = Slots(reported=2)
    busy_one = [{"is_processing": True}, {"is_processing": False}]
    idle = [{"is_processing": False}, {"is_processing": False}]
    for listing in (busy_one, idle, busy_one, idle):
        s.reconcile(listing, own_before=0)
        assert s.external == 0
    s.reconcile(busy_one, own_before=0)
    s.reconcile(busy_one, own_before=0)
    assert s.external == 1


def test_unreadable_slots_fall_back_to_own_counts() -> None:
    s = Slots(reported=2, external=1, readable=True)
    assert s.unreadable() is True
    assert (s.external, s.source) == (0, "router")
    assert s.reconcile({"error": "nope"}, own_before=0) is False and s.readable is False


# --- slot-aware balancer --------------------------------------------------------------


def test_most_free_slots_wins_and_a_full_tier_spills_to_the_next() -> None:
    a, b, c = endpoint("a", 4, busy=3), endpoint("b", 4, busy=1), endpoint("c", 2, priority=50)
    balancer = SlotAware()
    assert balancer.pick([[a, b], [c]]) is b
    b.slots.own = 4
    assert balancer.pick([[a, b], [c]]) is a
    a.slots.own = 4
    assert balancer.pick([[a, b], [c]]) is c
    c.slots.own = 2
    assert balancer.pick([[a, b], [c]]) is None


def test_ties_go_to_the_faster_then_rotate() -> None:
    a, b, c = endpoint("a", 2), endpoint("b", 2), endpoint("c", 2)
    a.record_speed(0.5, 10.0)
    b.record_speed(0.05, 50.0)
    c.record_speed(0.05, 50.0)
    balancer = SlotAware()
    picks = [balancer.pick([[a, b, c]]) for _ in range(4)]
    assert picks == [b, c, b, c]


def test_the_preferred_endpoint_wins_while_it_has_a_free_slot() -> None:
    a, b = endpoint("a", 2, busy=1), endpoint("b", 4)
    balancer = SlotAware()
    assert balancer.pick([[a, b]], preferred=a) is a
    a.slots.own = 2
    assert balancer.pick([[a, b]], preferred=a) is b  # full: load wins, the conversation moves
    low = endpoint("low", 2, priority=1)
    assert balancer.pick([[b], [low]], preferred=low) is b  # priority comes before affinity


def test_requests_that_take_no_slot_never_wait() -> None:
    a = endpoint("a", 1, busy=1)
    assert SlotAware().pick([[a]], need_slot=False) is a


# --- the router's queue and affinity ------------------------------------------------------


async def waiting(queue: SlotQueue, pool: Pool, preferred: Endpoint | None) -> asyncio.Task[Endpoint]:
    task = asyncio.create_task(queue.acquire(pool, preferred=preferred))
    await asyncio.sleep(0)  # let it join the queue
    return task


async def test_a_freed_slot_goes_to_the_waiter_whose_conversation_is_cached_there() -> None:
    a, b = endpoint("a", 1, busy=1), endpoint("b", 1, busy=1)
    a.health = b.health = Health.HEALTHY
    pool, queue = Pool("m", (a, b)), SlotQueue(SlotAware(), 10, 5.0, Metrics())
    homed_b, homed_a, anywhere = [await waiting(queue, pool, p) for p in (b, a, None)]
    queue.release(a)
    await asyncio.sleep(0)
    assert homed_a.done() and homed_a.result() is a  # ahead of the earlier waiter, which would have to move
    assert not homed_b.done() and not anywhere.done()
    queue.release(b)
    await asyncio.sleep(0)
    assert homed_b.result() is b and not anywhere.done()
    queue.release(a)
    await asyncio.sleep(0)
    assert anywhere.result() is a


async def test_a_waiter_is_passed_over_for_affinity_a_bounded_number_of_times() -> None:
    a, b = endpoint("a", 1, busy=1), endpoint("b", 1, busy=1)
    a.health = b.health = Health.HEALTHY
    pool, queue = Pool("m", (a, b)), SlotQueue(SlotAware(), 100, 5.0, Metrics())
    head = await waiting(queue, pool, b)  # b never frees; a keeps freeing for newcomers homed on a
    for _ in range(MAX_OVERTAKEN):
        newcomer = await waiting(queue, pool, a)
        queue.release(a)
        await asyncio.sleep(0)
        assert newcomer.result() is a and not head.done()
    newcomer = await waiting(queue, pool, a)
    queue.release(a)
    await asyncio.sleep(0)
    assert head.result() is a and not newcomer.done()  # overdue: served first, its conversation moves
    newcomer.cancel()


def one_busy_slot(hold: float) -> tuple[Endpoint, Pool, SlotQueue, bytes]:
    """An endpoint whose only slot a conversation's first turn holds, its pool, a queue, and that turn's key."""
    a = endpoint("a", 1, busy=1)
    a.health = Health.HEALTHY
    keys = keys_for("m", "/v1/chat/completions", chat("hi"), None)
    assert keys is not None and keys.record is not None
    return a, Pool("m", (a,)), SlotQueue(SlotAware(), 10, 5.0, Metrics(), hold=hold), keys.record


async def test_a_finished_turn_keeps_its_slot_for_the_conversations_next_turn() -> None:
    a, pool, queue, first = one_busy_slot(hold=5.0)
    queue.release(a, hold_for=first)
    assert a.slots.free == 0 and len(queue.holds) == 1  # kept, not handed to a newcomer
    stranger = await waiting(queue, pool, None)
    following = keys_for("m", "/v1/chat/completions", chat("hi", "hello", "more"), None)
    assert await queue.acquire(pool, keys=following) is a  # ahead of the stranger already waiting
    assert not stranger.done() and not queue.holds and queue.holds_taken == 1
    stranger.cancel()


async def test_a_hold_nobody_takes_expires_and_serves_the_queue() -> None:
    a, pool, queue, record = one_busy_slot(hold=0.05)
    loop = asyncio.get_running_loop()
    released = loop.time()
    queue.release(a, hold_for=record)
    stranger = await waiting(queue, pool, None)
    assert await stranger is a
    assert loop.time() - released >= 0.05 and queue.holds_expired == 1
    queue.hold = 0  # off: a finished turn gives its slot straight back
    queue.release(a, hold_for=record)
    assert a.slots.free == 1 and not queue.holds


# --- affinity ---------------------------------------------------------------------------


SYSTEM = {"role": "system", "content": "You are terse."}


def chat(*turns: str) -> dict:  # type: ignore[type-arg]
    messages = [SYSTEM]
    for i, text in enumerate(turns):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return {"model": "m", "messages": messages}


def test_the_next_chat_turn_finds_the_previous_turn() -> None:
    remembered = AffinityMap(100, ttl=60)
    first = keys_for("m", "/v1/chat/completions", chat("hi"), None)
    assert first is not None
    assert remembered.find(first, now=0) is None
    remembered.remember(first, "a", now=0)
    second = keys_for("m", "/v1/chat/completions", chat("hi", "hello!", "how are you?"), None)
    assert second is not None and remembered.find(second, now=1) == "a"
    remembered.remember(second, "a", now=1)
    third = keys_for("m", "/v1/chat/completions", chat("hi", "hello!", "how are you?", "fine", "bye"), None)
    assert third is not None and remembered.find(third, now=2) == "a"


def test_conversations_sharing_a_system_prompt_do_not_share_a_key() -> None:
    remembered = AffinityMap(100, ttl=60)
    remembered.remember(keys_for("m", "/v1/chat/completions", chat("first conversation"), None), "a", now=0)
    other = keys_for("m", "/v1/chat/completions", chat("another one"), None)
    assert other is not None and remembered.find(other, now=0) is None


def test_keys_include_the_model_and_sessions_override_the_prompt() -> None:
    remembered = AffinityMap(100, ttl=60)
    remembered.remember(keys_for("m", "/v1/chat/completions", chat("hi"), None), "a", now=0)
    assert remembered.find(keys_for("other", "/v1/chat/completions", chat("hi", "x", "y"), None), now=0) is None
    session = keys_for("m", "/v1/chat/completions", chat("anything"), "s-1")
    remembered.remember(session, "b", now=0)
    assert remembered.find(keys_for("m", "/completion", {"prompt": "different"}, "s-1"), now=0) == "b"


def test_a_growing_completion_prompt_finds_its_earlier_prefix() -> None:
    remembered = AffinityMap(100, ttl=60)
    prompt = "x" * (3 * BLOCK + 17)
    first = keys_for("m", "/completion", {"prompt": prompt}, None)
    remembered.remember(first, "a", now=0)
    longer = keys_for("m", "/v1/completions", {"prompt": prompt + " and more" * 100}, None)
    assert longer is not None and remembered.find(longer, now=0) == "a"
    assert keys_for("m", "/completion", {"prompt": "short"}, None) is None
    infill = keys_for("m", "/infill", {"input_prefix": "def f():\n" * 60, "input_suffix": ""}, None)
    assert infill is not None and infill.record is not None


def test_the_map_is_bounded_and_forgets_idle_entries() -> None:
    remembered = AffinityMap(max_entries=3, ttl=10)
    keys = [keys_for("m", "/v1/chat/completions", chat(f"conversation {i}"), None) for i in range(5)]
    for i, k in enumerate(keys):
        remembered.remember(k, f"e{i}", now=i)
    assert len(remembered) == 3
    follow_up = [keys_for("m", "/v1/chat/completions", chat(f"conversation {i}", "a", "b"), None) for i in range(5)]
    assert [remembered.find(k, now=5) for k in follow_up] == [None, None, "e2", "e3", "e4"]
    assert remembered.find(follow_up[4], now=16) is None  # idle past the ttl
    assert len(remembered) == 2
