"""The adversary: at random moments, one fault on one emulated endpoint, cleared a few seconds later.

It acts only on an endpoint that shows no fault, and only while another endpoint
of the same model is settled (see timeline), so each model keeps a healthy
endpoint, except in a blackout, which kills every endpoint of one model at once.
Its first actions are one of each kind in a seeded random order; after that the
kinds are drawn by weight.

    kill          crash (listener closed, connections dropped), restart after a few seconds
    blackout      kill every endpoint of one model
    hang_headers  generation requests get no answer
    hang_stream   streams go silent after a few tokens
    cut_stream    streams are dropped after a few tokens
    slow_decode   every token takes longer
    fail_health   /health answers 500
    reject        generation requests get 502 or 503
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from bench.chaos.timeline import KINDS, Timeline
from olla.sim import SimServer

WEIGHTS = {"kill": 3.0, "blackout": 0.5}  # the other kinds weigh 2

Params = tuple[str, dict[str, Any], float, str]  # sim fault, its parameters, seconds held, detail


def _params(kind: str, rng: random.Random) -> Params:
    choices: dict[str, Callable[[], Params]] = {
        "kill": lambda: ("crash", {}, rng.uniform(1.5, 5.0), ""),
        "blackout": lambda: ("crash", {}, rng.uniform(1.5, 3.0), ""),
        "hang_headers": lambda: ("hang_headers", {}, rng.uniform(2.0, 5.0), ""),
        "hang_stream": lambda: _after("hang_stream", rng.randint(1, 6), rng.uniform(2.0, 5.0)),
        "cut_stream": lambda: _after("cut_stream", rng.randint(1, 6), rng.uniform(1.0, 4.0)),
        "slow_decode": lambda: _delay(rng.uniform(0.05, 0.25), rng.uniform(3.0, 8.0)),
        "fail_health": lambda: ("fail_health", {}, rng.uniform(2.0, 6.0), ""),
        "reject": lambda: _status(rng.choice((502, 503)), rng.uniform(1.0, 4.0)),
    }
    return choices[kind]()


def _after(fault: str, after: int, seconds: float) -> Params:
    return fault, {"after": after}, seconds, f"after {after} tokens"


def _delay(delay: float, seconds: float) -> Params:
    return "slow_decode", {"delay": delay}, seconds, f"+{delay * 1000:.0f} ms per token"


def _status(status: int, seconds: float) -> Params:
    return "status", {"status": status}, seconds, f"HTTP {status}"


class Adversary:
    def __init__(self, servers: Mapping[str, SimServer], timeline: Timeline, rng: random.Random, pace: float) -> None:
        self.servers = dict(servers)
        self.timeline = timeline
        self.rng = rng
        self.pace = pace  # mean seconds between two actions
        self.skipped = 0  # draws that found no endpoint it was allowed to act on
        self._first = rng.sample(KINDS, len(KINDS))
        self._held: set[asyncio.Task[None]] = set()

    async def run(self, until: float) -> None:
        while (now := time.monotonic()) < until:
            await asyncio.sleep(min(self.rng.expovariate(1 / self.pace), until - now))
            if time.monotonic() >= until:
                return
            kind = self._first[0] if self._first else self._draw()
            targets = self._targets(kind)
            if not targets:
                self.skipped += 1
                continue
            if self._first:
                self._first.pop(0)
            task = asyncio.create_task(self._hold(kind, targets))
            self._held.add(task)
            task.add_done_callback(self._held.discard)

    async def stop(self) -> None:
        """Clear every fault still held (restarting killed endpoints)."""
        for task in list(self._held):
            task.cancel()
        await asyncio.gather(*self._held, return_exceptions=True)

    def _draw(self) -> str:
        return self.rng.choices(KINDS, [WEIGHTS.get(k, 2.0) for k in KINDS])[0]

    def _targets(self, kind: str) -> list[str]:
        now = time.monotonic()
        if kind == "blackout":
            models = sorted({self.timeline.models[e] for e in self.servers})
            whole = [[e for e in self.servers if self.timeline.models[e] == m] for m in models]
            calm = [group for group in whole if not any(self.timeline.faulty(e) for e in group)]
            return self.rng.choice(calm) if calm else []
        spare = [e for e in self.servers if not self.timeline.faulty(e)
                 and any(self.timeline.settled(m, now) for m in self.timeline.mates(e))]  # fmt: skip
        return [self.rng.choice(spare)] if spare else []

    async def _hold(self, kind: str, targets: list[str]) -> None:
        fault, params, seconds, detail = _params(kind, self.rng)
        now = time.monotonic()
        for name in targets:
            self.servers[name].set_fault(fault, **params)
            self.timeline.begin(name, kind, now, detail)
        try:
            await asyncio.sleep(seconds)
        finally:
            for name in targets:
                server = self.servers[name]
                server.clear_faults(fault)
                # A killed endpoint restarts into its loading phase; it is back once that is over.
                reloading = server.config.load_seconds if fault == "crash" else 0.0
                self.timeline.end(name, time.monotonic() + reloading)
