"""The emulated fleet in its own process, and the count of requests that waited on an endpoint needlessly."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

from bench.common import ROOT, process
from bench.routing.workload import FLEET, SAMPLE_SECONDS
from olla.sim import SimFleet, SimServer


class WaitWatch:
    """Counts requests that start waiting inside an endpoint while another endpoint of its model has a free slot.

    Sampled: a rise in an endpoint's `waiting` between two samples is that many
    requests queued there; it is avoidable when, at that sample, another member
    of the same model has fewer busy slots than slots.
    """

    def __init__(self, servers: list[SimServer]) -> None:
        self.servers = servers
        self.previous = [0] * len(servers)
        self.queued = 0
        self.avoidable = 0
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1
        for i, server in enumerate(self.servers):
            rise = server.waiting - self.previous[i]
            self.previous[i] = server.waiting
            if rise <= 0:
                continue
            self.queued += rise
            if any(o is not server and o.config.model == server.config.model and o.busy_slots < o.config.slots
                   for o in self.servers):  # fmt: skip
                self.avoidable += rise

    async def run(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            self.sample()
            await asyncio.sleep(SAMPLE_SECONDS)


async def serve_fleet(lifetime: float) -> None:
    """Print the fleet's URLs, sample until stdin closes (or `lifetime` passes), then print the counts."""
    async with SimFleet(FLEET.values()) as fleet:
        loop = asyncio.get_running_loop()
        watch = WaitWatch(fleet.servers)
        began = loop.time()
        sampling = asyncio.create_task(watch.run(began + lifetime))
        print(json.dumps({"urls": fleet.urls}), flush=True)
        stdin = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stdin.read(), lifetime)
        sampling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampling
        period = (loop.time() - began) / max(watch.samples, 1)
        counts = {"queued": watch.queued, "avoidable": watch.avoidable, "period_ms": period * 1000}
        print(json.dumps(counts), flush=True)


@contextlib.contextmanager
def fleet_process(lifetime: float) -> Iterator[tuple[list[str], Callable[[], dict[str, Any]]]]:
    """The fleet's URLs, and a function that stops it and returns its wait counts."""
    args = [sys.executable, "-m", "bench.routing", "--serve-fleet", str(lifetime)]
    with process(args, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        pipe_in, pipe_out = proc.stdin, proc.stdout
        if pipe_in is None or pipe_out is None:
            raise RuntimeError("the fleet process has no pipes")
        started = json.loads(pipe_out.readline() or "{}")
        if "urls" not in started:
            raise RuntimeError("the fleet process did not start")

        def stop() -> dict[str, Any]:
            pipe_in.close()
            report: dict[str, Any] = json.loads(pipe_out.readline() or "{}")
            return report

        yield started["urls"], stop
