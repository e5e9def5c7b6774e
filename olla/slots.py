"""Slot accounting for one endpoint: how many llama.cpp slots it has and how many are busy.

Total slots, first known of: `/props` `total_slots`, the length of `/slots`,
the endpoint's configured `slots`, the profile's default.

Busy slots are the router's own claims, counted exactly on the routes that take
a slot, plus the slots other clients keep busy, learned from `/slots`
(`is_processing`) on a modest interval. An endpoint whose `/slots` is off
(`--no-slots`, 501) or behind a key the router lacks (401) runs on its own
counts alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Slots:
    default: int = 4
    configured: int | None = None
    reported: int | None = None  # /props total_slots
    listed: int | None = None  # len(/slots)
    own: int = 0
    external: int = 0
    readable: bool | None = None  # None until /slots was tried
    _excess: int = 0  # the previous reading's processing slots beyond the router's own

    @property
    def total(self) -> int:
        for known in (self.reported, self.listed, self.configured):
            if known is not None and known > 0:
                return known
        return self.default

    @property
    def busy(self) -> int:
        return min(self.total, self.own + self.external)

    @property
    def free(self) -> int:
        return max(0, self.total - self.own - self.external)

    @property
    def source(self) -> str:
        """Where the busy count comes from: `slots` (reconciled with /slots) or `router` (own counts)."""
        return "slots" if self.readable else "router"

    def claim(self) -> None:
        self.own += 1

    def release(self) -> None:
        self.own -= 1

    def reconcile(self, listing: Any, own_before: int) -> bool:
        """Apply a /slots listing; True when it freed capacity. Bad listings count as unreadable.

        The listing is a snapshot taken while the request was in flight, so the
        router's own share of it is at most the larger of its claims before and
        after: counting the larger one never invents external load. A slot that
        finished a router request just before the snapshot can still show as
        processing, so external load counts only what two readings in a row agree
        on: churn vanishes, another client holding a slot is seen one interval later.
        """
        if not isinstance(listing, list) or not all(isinstance(s, dict) for s in listing):
            self.readable = False
            self.external = 0
            return False
        processing = sum(1 for s in listing if s.get("is_processing") is True)
        before = self.free
        self.readable = True
        self.listed = len(listing) or None
        excess = max(0, processing - max(own_before, self.own))
        self.external = min(excess, self._excess)
        self._excess = excess
        return self.free > before

    def unreadable(self) -> bool:
        """/slots is off or refused: forget external load; True when that freed capacity."""
        before = self.free
        self.readable = False
        self.external = self._excess = 0
        return self.free > before
