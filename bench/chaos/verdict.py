"""What each request's fate means given what the adversary did, and the criteria a run must meet.

A request that got no response body (status 0 or >= 500, other than 503
`slots_exhausted`) failed before the first byte. That is expected when its
model was down at some time while it ran (see timeline), and, by design, for a
504 `backend_timeout` while an endpoint of its model was hung: on a route that
takes a slot the router waits for headers up to `proxy.response_timeout`
(docs/routing.md, "The rule for silence before headers"). The hung endpoint is
any one the error names, not only one that timed out: a hang that ends in a
kill drops the waiting attempt, and the next endpoint gets what is left of the
deadline. Any other such
failure had a healthy candidate to go to. A 200 whose body ended early (an SSE
`error` event, no `[DONE]`, a dropped connection) was cut mid-stream; it is
explained only when the endpoint named in `X-Olla-Endpoint` was killed, hung or
cut by the adversary while the request ran.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from bench.chaos.clients import Result
from bench.chaos.timeline import BREAKING, HANGING, KINDS, Timeline

OK = "ok"
SLOTS_EXHAUSTED = "503 slots_exhausted"
RATE_LIMITED = "429 rate_limit_exceeded"
DOWN = "failed before the first byte, every candidate down"
HUNG = "failed before the first byte, 504 after an endpoint was hung"
FAILED = "failed before the first byte while a candidate was healthy"
CUT = "cut mid-stream, on an endpoint the adversary broke"
CUT_ELSEWHERE = "cut mid-stream, anywhere else"
OTHER = "any other answer"
VERDICTS = (OK, SLOTS_EXHAUSTED, RATE_LIMITED, DOWN, HUNG, FAILED, CUT, CUT_ELSEWHERE, OTHER)
UNEXPLAINED = (FAILED, CUT_ELSEWHERE, OTHER)

MEMORY_GROWTH_LIMIT = 0.10
_NAMED = re.compile(r"\bendpoint (\S+) ")


def classify(results: Iterable[Result], timeline: Timeline) -> list[str]:
    down = {model: timeline.down(model) for model in set(timeline.models.values())}
    members = {model: [e for e, m in timeline.models.items() if m == model] for model in down}

    def verdict(r: Result) -> str:
        if r.ok:
            return OK
        if r.status == 503 and r.code == "slots_exhausted":
            return SLOTS_EXHAUSTED
        if r.status == 429:
            return RATE_LIMITED
        if r.status == 200:
            broken = r.endpoint and timeline.hit(r.endpoint, BREAKING, r.sent, r.ended)
            return CUT if broken else CUT_ELSEWHERE
        if r.status and r.status < 500:
            return OTHER
        if any(s <= r.ended and r.sent <= e for s, e in down.get(r.model, [])):
            return DOWN
        if r.status == 504:
            # A stream's headers go out with its first token, so only a non-streamed request waits out hang_stream.
            kinds = {"hang_headers"} if r.kind == "stream" else HANGING
            own = members.get(r.model, [])
            suspects = [e for e in _NAMED.findall(r.message) if e in own] or own
            if any(timeline.hit(e, kinds, r.sent, r.ended) for e in suspects):
                return HUNG
        return FAILED

    return [verdict(r) for r in results]


@dataclass(frozen=True)
class Leftover:
    """What was still busy once the run had ended and the harness had waited for quiet."""

    router_in_flight: int
    router_busy_slots: int
    router_queued: int
    sim_busy_slots: int
    sim_waiting: int
    sim_unread: int  # endpoints whose /slots did not answer 200
    waited: float  # seconds the harness waited for quiet

    @property
    def total(self) -> int:
        return (self.router_in_flight + self.router_busy_slots + self.router_queued + self.sim_busy_slots
                + self.sim_waiting + self.sim_unread)  # fmt: skip


@dataclass(frozen=True)
class Memory:
    """The router's resident set size in kB: `samples` are (seconds since the start, kB)."""

    samples: list[tuple[float, int]]
    warmup_at: float  # seconds since the start

    @property
    def start(self) -> int:
        return self.samples[0][1]

    @property
    def warm(self) -> int:
        return next((kb for t, kb in self.samples if t >= self.warmup_at), self.samples[-1][1])

    @property
    def end(self) -> int:
        return self.samples[-1][1]

    @property
    def peak(self) -> int:
        return max(kb for _, kb in self.samples)

    @property
    def growth(self) -> float:
        return (self.end - self.warm) / self.warm


@dataclass(frozen=True)
class Criterion:
    name: str
    measured: str
    met: bool


def criteria(
    verdicts: Mapping[str, int], leftover: Leftover, memory: Memory, actions: Mapping[str, int]
) -> list[Criterion]:
    missing = [kind for kind in KINDS if not actions.get(kind)]
    return [
        Criterion("no request failed before the first byte while a candidate was healthy",
                  f"{verdicts[FAILED]} failed", verdicts[FAILED] == 0),
        Criterion("streams cut only on endpoints the adversary killed, hung or cut during the request",
                  f"{verdicts[CUT]} cut there, {verdicts[CUT_ELSEWHERE]} elsewhere", verdicts[CUT_ELSEWHERE] == 0),
        Criterion("no other kind of failure (4xx other than 429)", f"{verdicts[OTHER]}", verdicts[OTHER] == 0),
        Criterion("no slot left busy after the run, on either side",
                  f"router: {leftover.router_in_flight} in flight, {leftover.router_busy_slots} busy slots, "
                  f"{leftover.router_queued} queued; emulator: {leftover.sim_busy_slots} busy slots, "
                  f"{leftover.sim_waiting} waiting, {leftover.sim_unread} unread", leftover.total == 0),
        Criterion(f"router memory grew less than {MEMORY_GROWTH_LIMIT:.0%} after warm-up",
                  f"{memory.warm / 1024:.1f} MiB -> {memory.end / 1024:.1f} MiB ({memory.growth:+.1%})",
                  memory.growth < MEMORY_GROWTH_LIMIT),
        Criterion("the adversary ran every kind of action", ", ".join(f"{k} {actions.get(k, 0)}" for k in KINDS),
                  not missing),
    ]  # fmt: skip


def tally(verdicts: Iterable[str]) -> Counter[str]:
    counts = Counter(dict.fromkeys(VERDICTS, 0))
    counts.update(verdicts)
    return counts
