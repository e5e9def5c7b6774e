"""Balancer policies: `pick(candidates) -> endpoint`, chosen by name from BALANCERS.

The candidates are already the best priority tier of routable endpoints (see
`registry.Pool.candidates`), so every policy respects priority. Policies do no
I/O and take their random source from the caller.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from typing import Protocol

from olla.endpoint import Endpoint


class Balancer(Protocol):
    name: str

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint: ...


class Priority:
    """The best tier only; a random member of it (the tier is already chosen upstream)."""

    name = "priority"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        return candidates[0] if len(candidates) == 1 else self._rng.choice(candidates)


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


class RoundRobin:
    """Each candidate in turn."""

    name = "round-robin"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rotation = Rotation()

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        return self._rotation.pick(candidates)


class LeastConnections:
    """The candidate with the fewest requests in flight; ties rotate."""

    name = "least-connections"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rotation = Rotation()

    def pick(self, candidates: Sequence[Endpoint]) -> Endpoint:
        fewest = min(e.in_flight for e in candidates)
        return self._rotation.pick([e for e in candidates if e.in_flight == fewest])


BALANCERS: dict[str, Callable[..., Balancer]] = {
    Priority.name: Priority,
    RoundRobin.name: RoundRobin,
    LeastConnections.name: LeastConnections,
}
