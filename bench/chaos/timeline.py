"""What the adversary did and when: one fault at a time per endpoint, and what follows from that.

An endpoint is *settled* once `settle` seconds have passed since its last fault
ended (a killed endpoint's fault ends when it has reloaded): by then the router
has had time to bring it back (offline backoff, then two good probes). A hang
lingers `linger` seconds more: a request it held gets no headers until the
router's `response_timeout`, and that late timeout takes the endpoint out of
rotation unless the endpoint has answered a request well since. A model is *down* while none of its endpoints is settled.
Every time is `time.monotonic()`, the clock the clients stamp their requests with.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Interval = tuple[float, float]

# Kinds of action, and which ones explain what a client saw.
KINDS = ("kill", "blackout", "hang_headers", "hang_stream", "cut_stream", "slow_decode", "fail_health", "reject")
BREAKING = frozenset({"kill", "blackout", "hang_stream", "cut_stream"})  # can end a stream early
HANGING = frozenset({"hang_headers", "hang_stream"})  # can hold a request without headers


@dataclass(frozen=True)
class Action:
    kind: str
    endpoint: str
    start: float
    end: float
    detail: str = ""


class Timeline:
    def __init__(self, models: Mapping[str, str], settle: float, linger: float = 0.0) -> None:
        self.models = dict(models)  # endpoint: model
        self.settle = settle
        self.linger = linger
        self.actions: list[Action] = []
        self._open: dict[str, tuple[str, float, str]] = {}  # endpoint: (kind, start, detail)
        self._settles_at: dict[str, float] = dict.fromkeys(models, -math.inf)

    # --- while the run goes on --------------------------------------------------------

    def begin(self, endpoint: str, kind: str, now: float, detail: str = "") -> None:
        if endpoint in self._open:
            raise ValueError(f"{endpoint} already shows {self._open[endpoint][0]}")
        self._open[endpoint] = (kind, now, detail)

    def end(self, endpoint: str, clean_at: float) -> None:
        kind, start, detail = self._open.pop(endpoint)
        action = Action(kind, endpoint, start, clean_at, detail)
        self.actions.append(action)
        self._settles_at[endpoint] = max(self._settles_at[endpoint], self._settles(action))

    def faulty(self, endpoint: str) -> bool:
        return endpoint in self._open

    def settled(self, endpoint: str, now: float) -> bool:
        return not self.faulty(endpoint) and now >= self._settles_at[endpoint]

    def mates(self, endpoint: str) -> list[str]:
        """The other endpoints serving the same model."""
        model = self.models[endpoint]
        return [e for e, m in self.models.items() if m == model and e != endpoint]

    # --- after the run ------------------------------------------------------------------

    def hit(self, endpoint: str, kinds: Iterable[str], start: float, end: float) -> bool:
        """Whether the adversary acted on `endpoint` with one of `kinds` at some time in [start, end]."""
        wanted = frozenset(kinds)
        return any(a.endpoint == endpoint and a.kind in wanted and a.start <= end and start <= a.end
                   for a in self.actions)  # fmt: skip

    def down(self, model: str) -> list[Interval]:
        """The intervals in which no endpoint of `model` was settled."""
        members = [e for e, m in self.models.items() if m == model]
        unsettled = {e: [(a.start, self._settles(a)) for a in self.actions if a.endpoint == e] for e in members}
        edges = sorted({t for spans in unsettled.values() for span in spans for t in span})
        out: list[Interval] = []
        for a, b in itertools.pairwise(edges):
            middle = (a + b) / 2
            if all(any(s <= middle <= e for s, e in unsettled[m]) for m in members):
                if out and out[-1][1] == a:
                    out[-1] = (out[-1][0], b)
                else:
                    out.append((a, b))
        return out

    def _settles(self, action: Action) -> float:
        return action.end + self.settle + (self.linger if action.kind in HANGING else 0.0)

    def count(self) -> dict[str, int]:
        """Actions per kind; a blackout counts once however many endpoints it took down."""
        seen: dict[str, set[float]] = {kind: set() for kind in KINDS}
        for a in self.actions:
            seen[a.kind].add(a.start)
        return {kind: len(starts) for kind, starts in seen.items()}
