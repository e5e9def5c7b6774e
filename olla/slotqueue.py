"""The router's queue: a request that needs a slot waits here, not on a busy llama-server.

llama-server accepts everything and parks requests beyond its slots in a queue
of its own, sending no headers until a slot frees, while another endpoint may
sit idle. So a request that takes a slot claims one through `acquire`: at once
when the balancer finds a free slot and nobody is waiting, otherwise in its
pool's FIFO. Every released slot, recovery or newly learned capacity hands free
slots to waiters in arrival order (a waiter that cannot use the freed endpoint,
having already failed there, lets the next one have it), with one exception for
KV-cache affinity: a waiter whose preferred endpoint has the free slot takes it
ahead of earlier waiters, which would have to move their conversation there and
re-process it. The exception is bounded: a waiter passed over `MAX_OVERTAKEN`
times is served before anyone else.

A conversation's turn also keeps its slot for `hold` seconds after it ends
(`release` with its affinity key): the next turn, looking that key up, takes the
slot at once. Without it a waiting request would take the freed slot, and
llama-server would overwrite the conversation's cached prompt with its own.

A full queue, or a wait beyond the timeout, answers 503 `slots_exhausted` with
Retry-After. A client that leaves while waiting is simply dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from olla.affinity import Keys
from olla.alarms import Alarm, Alarms
from olla.balancer import Balancer, Tiers
from olla.endpoint import Endpoint
from olla.errors import NoHealthyEndpoint, SlotsExhausted
from olla.metrics import Metrics
from olla.registry import Pool

MAX_OVERTAKEN = 8  # how often a waiter can be passed over for affinity: ~8 slot releases of extra wait at most


@dataclass(eq=False)
class Waiter:
    future: asyncio.Future[Endpoint]
    exclude: tuple[Endpoint, ...]
    preferred: Endpoint | None
    overtaken: int = 0


@dataclass(eq=False)
class Waitlist:
    pool: Pool
    label: str
    waiters: deque[Waiter] = field(default_factory=deque)
    waited: int = 0
    wait_seconds: float = 0.0
    rejected: int = 0


class SlotQueue:
    def __init__(self, balancer: Balancer, max_size: int, timeout: float, metrics: Metrics, hold: float = 0.0) -> None:
        self.balancer = balancer
        self.max_size = max_size
        self.timeout = timeout
        self.metrics = metrics
        self.hold = hold
        self.waitlists: dict[frozenset[str], Waitlist] = {}
        self.holds: dict[int, tuple[Endpoint, Alarm]] = {}  # conversation key: its held slot
        self.alarms = Alarms()  # a hold's end: one per request that continues a conversation
        self.holds_taken = self.holds_expired = 0
        self.recount: Callable[[Endpoint], None] = lambda endpoint: None  # asks for a fresh /slots reading

    async def acquire(
        self, pool: Pool, exclude: Sequence[Endpoint] = (), preferred: Endpoint | None = None, keys: Keys | None = None,
        tiers: Tiers | None = None,
    ) -> Endpoint:  # fmt: skip
        """An endpoint of the pool with a slot claimed for this request; may wait for one.

        `tiers`: the pool's tiers without `exclude`, when the caller has just worked them out."""
        held = self._take_hold(keys, pool, exclude) if keys is not None and self.holds else None
        if held is not None:
            return held
        if tiers is None:
            tiers = pool.tiers(exclude)
        if not tiers:
            raise NoHealthyEndpoint(pool.unavailable_reason())
        waitlist = self._waitlist(pool)
        if not waitlist.waiters:
            endpoint = self.balancer.pick(tiers, preferred)
            if endpoint is not None:
                endpoint.slots.claim()
                return endpoint
        if len(waitlist.waiters) >= self.max_size:
            self._reject(waitlist, "full")
            raise SlotsExhausted()
        waiter = Waiter(asyncio.get_running_loop().create_future(), tuple(exclude), preferred)
        waitlist.waiters.append(waiter)
        for member in pool.members:
            if member.slots.external:  # the wait may rest on other clients' load, read some time ago
                self.recount(member)
        self.metrics.queue_length.labels(waitlist.label).set(len(waitlist.waiters))
        self._dispatch(waitlist)  # those ahead may already hold their slots, and one may be free
        started = time.monotonic()
        taken: Endpoint | None = None
        try:
            async with asyncio.timeout(self.timeout):
                taken = await waiter.future
                return taken
        except TimeoutError:
            self._reject(waitlist, "timeout")
            raise SlotsExhausted() from None
        finally:
            self._leave(waitlist, waiter, time.monotonic() - started)
            future = waiter.future
            if taken is None and future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result())  # handed a slot in the instant it timed out or its client left

    def release(self, endpoint: Endpoint, hold_for: int | None = None) -> None:
        """Give the slot back, or with a conversation key keep it `hold` seconds for that conversation."""
        if hold_for is None or self.hold <= 0 or not endpoint.routable:
            endpoint.slots.release()
            self.wake(endpoint)
            return
        self._end_hold(hold_for)  # the same conversation twice at once: the older slot goes back
        handle = self.alarms.call_at(time.monotonic() + self.hold, self._end_hold, hold_for, True)
        self.holds[hold_for] = (endpoint, handle)

    def _take_hold(self, keys: Keys, pool: Pool, exclude: Sequence[Endpoint]) -> Endpoint | None:
        for key in keys.lookup:
            if key not in self.holds:
                continue
            endpoint, handle = self.holds[key]
            if endpoint in pool.members and endpoint.routable and endpoint not in exclude:
                handle.cancel()
                del self.holds[key]
                self.holds_taken += 1
                return endpoint
            self._end_hold(key)
        return None

    def _end_hold(self, key: int, expired: bool = False) -> None:
        hold = self.holds.pop(key, None)
        if hold is not None:
            endpoint, handle = hold
            handle.cancel()
            self.holds_expired += expired
            self.release(endpoint)

    def follow(self, endpoints: Sequence[Endpoint], gone: Sequence[Endpoint] = ()) -> None:
        """After a reload: waiters follow the endpoints now registered under their pool's names."""
        for endpoint in gone:
            self.wake(endpoint)  # with the pools as they were: a wait for a model nothing serves now ends at once
        for names, waitlist in self.waitlists.items():
            waitlist.pool = Pool(waitlist.pool.model, tuple(e for e in endpoints if e.name in names))
        for endpoint in endpoints:
            if endpoint.routable:  # not every pool: one of endpoints not probed yet would turn its waiters away
                self.wake(endpoint)

    def wake(self, endpoint: Endpoint | None = None) -> None:
        """Capacity may have appeared (on `endpoint`, or anywhere): serve waiters in arrival order."""
        for waitlist in list(self.waitlists.values()):
            if waitlist.waiters and (endpoint is None or endpoint in waitlist.pool.members):
                self._dispatch(waitlist)

    def _dispatch(self, waitlist: Waitlist) -> None:
        pool = waitlist.pool
        if not pool.tiers():
            failure = NoHealthyEndpoint(pool.unavailable_reason())
            for waiter in waitlist.waiters:
                if not waiter.future.done():
                    waiter.future.set_exception(failure)
            return
        if not any(e.routable and e.slots.free > 0 for e in pool.members):
            return
        waiting = [w for w in waitlist.waiters if not w.future.done()]
        overdue = [w for w in waiting if w.overtaken >= MAX_OVERTAKEN]
        for waiter in overdue:
            self._serve(pool, waiter)
        if not overdue:
            for i, waiter in enumerate(waiting):
                if waiter.preferred is not None and self._serve(pool, waiter, only=waiter.preferred):
                    for earlier in waiting[:i]:
                        earlier.overtaken += not earlier.future.done()
        for waiter in waiting:
            if not waiter.future.done():
                self._serve(pool, waiter)

    def _serve(self, pool: Pool, waiter: Waiter, only: Endpoint | None = None) -> bool:
        """Hand the waiter a slot the balancer picks for it (`only` that endpoint); False when none is free."""
        tiers = pool.tiers(waiter.exclude)
        endpoint = self.balancer.pick(tiers, waiter.preferred) if tiers else None
        if endpoint is None or (only is not None and endpoint is not only):
            return False
        endpoint.slots.claim()
        waiter.future.set_result(endpoint)
        return True

    def _leave(self, waitlist: Waitlist, waiter: Waiter, waited: float) -> None:
        waitlist.waiters.remove(waiter)
        waitlist.waited += 1
        waitlist.wait_seconds += waited
        self.metrics.queue_wait.labels(waitlist.label).observe(waited)
        self.metrics.queue_length.labels(waitlist.label).set(len(waitlist.waiters))

    def _reject(self, waitlist: Waitlist, reason: str) -> None:
        waitlist.rejected += 1
        self.metrics.queue_rejected.labels(waitlist.label, reason).inc()

    def _waitlist(self, pool: Pool) -> Waitlist:
        key = pool.names
        waitlist = self.waitlists.get(key)
        if waitlist is None:
            first = pool.members[0]
            label = first.discovery.models[0] if first.discovery else pool.model
            waitlist = self.waitlists[key] = Waitlist(pool, label)
        return waitlist
