"""Balancer policies: `pick(tiers, preferred, need_slot) -> endpoint or None`, chosen by name from BALANCERS.

`tiers` are the routable endpoints of a pool grouped by priority, best first
(`registry.Pool.tiers`). `preferred` is the endpoint that holds the request's
conversation in its KV cache, if known. `None` means "wait for a free slot":
only `slot-aware` ever answers it, and only when `need_slot` is set. Policies
do no I/O and take their random source from the caller.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from olla.endpoint import Endpoint

Tiers = Sequence[Sequence[Endpoint]]
SAME_PACE = 1.10  # paces within 10% of the fastest count as equal: measurements are noisy


class Balancer(Protocol):
    name: str

    def pick(self, tiers: Tiers, preferred: Endpoint | None = None, need_slot: bool = True) -> Endpoint | None: ...


class Rotation:
    """The least recently picked of the given endpoints.

    Fair for any subset: a counter shared by all pools would let requests for
    one model decide which member of another model's pool comes next.
    """

    def __init__(self) -> None:
        self._clock = itertools.count()
        self._last: dict[str, int] = {}

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        chosen = min(candidates, key=lambda e: self._last.get(e.name, -1))
        self._last[chosen.name] = next(self._clock)
        return chosen


class Priority:
    """The best tier only; a random member of it."""

    name = "priority"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, tiers: Tiers, preferred: Endpoint | None = None, need_slot: bool = True) -> Endpoint | None:
        best = tiers[0]
        return best[0] if len(best) == 1 else self._rng.choice(best)


class RoundRobin:
    """Each member of the best tier in turn."""

    name = "round-robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rotation = Rotation()

    def pick(self, tiers: Tiers, preferred: Endpoint | None = None, need_slot: bool = True) -> Endpoint | None:
        return self._rotation.pick(tiers[0])


class LeastConnections:
    """The member of the best tier with the fewest requests in flight; ties rotate."""

    name = "least-connections"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rotation = Rotation()

    def pick(self, tiers: Tiers, preferred: Endpoint | None = None, need_slot: bool = True) -> Endpoint | None:
        best = tiers[0]
        fewest = min(e.in_flight for e in best)
        return self._rotation.pick([e for e in best if e.in_flight == fewest])


class SlotAware:
    """Free llama.cpp slots first, within priority, keeping conversations on their KV cache.

    The first tier with a free slot (a full best tier spills to the next); in
    it the preferred endpoint while it has a free slot, else the one with the
    most free slots, then the better recent pace, then rotation. With no free
    slot anywhere the request waits (None). Requests that take no slot go to the
    best tier's least loaded member.
    """

    name = "slot-aware"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rotation = Rotation()

    def pick(self, tiers: Tiers, preferred: Endpoint | None = None, need_slot: bool = True) -> Endpoint | None:
        if not need_slot:
            return self._best(tiers[0])
        for tier in tiers:
            free = [e for e in tier if e.slots.free > 0]
            if not free:
                continue
            if preferred is not None and preferred in free:
                return preferred
            return self._best(free)
        return None

    def _best(self, endpoints: Sequence[Endpoint]) -> Endpoint:
        if len(endpoints) == 1:
            return endpoints[0]
        most = max(e.slots.free for e in endpoints)
        roomiest = [e for e in endpoints if e.slots.free == most]
        if len(roomiest) > 1:
            fastest = min(e.pace() for e in roomiest)
            roomiest = [e for e in roomiest if e.pace() <= fastest * SAME_PACE]
        return self._rotation.pick(roomiest)


BALANCERS: dict[str, Callable[..., Balancer]] = {
    SlotAware.name: SlotAware,
    Priority.name: Priority,
    RoundRobin.name: RoundRobin,
    LeastConnections.name: LeastConnections,
}
