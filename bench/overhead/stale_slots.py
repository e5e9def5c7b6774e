"""The earlier anomaly, reproduced: olla queues its own streams behind a direct client that has already left.

    .venv/bin/python -m bench.overhead.stale_slots   # needs a real llama-server (scripts/llama-server.sh)

A direct client keeps a llama-server's 16 slots busy for a few seconds, then
stops; at once the same streams go through olla. olla's `/slots` readings saw
the direct client's requests as another client's load, and it believes them
until its next reading (`discovery.slots_interval`, 2 s), so its requests wait
in its own slot queue meanwhile. Prints each round's latency and how many of
olla's requests waited (`olla_queue_wait_seconds`).
"""

from __future__ import annotations

import asyncio
import re
import statistics
import time

import aiohttp

from bench.common import router, static_endpoints, wait_discovered
from tests.llamacpp import LlamaServers, ServerSpec, tiny_model

STREAM = {"prompt": "Hello", "n_predict": 32, "stream": True}


async def streams(url: str, count: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    queue = iter(range(count))
    async with aiohttp.ClientSession() as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.post(url, json=STREAM, headers={"Connection": "close"}) as r:
                    await r.read()
                latencies.append(time.perf_counter() - started)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return sorted(latencies)


async def waited(base: str) -> int:
    """Requests that waited 5 ms or more in olla's slot queue, so far."""
    async with aiohttp.ClientSession() as session, session.get(base + "/metrics") as r:
        text = await r.text()
    buckets = re.finditer(r'olla_queue_wait_seconds_bucket\{le="([^"]+)"[^}]*\} (\S+)', text)
    counts = {m[1]: float(m[2]) for m in buckets}
    return int(counts.get("+Inf", 0) - counts.get("0.005", 0))


def main() -> None:
    spec = ServerSpec(model=tiny_model("chat"), alias="bench-model", slots=16, ctx_per_slot=256, threads=1)
    with LlamaServers([spec]) as servers, router(static_endpoints({"bench": servers[0].url})) as base:
        asyncio.run(wait_discovered(base, 1))
        for round_ in range(3):
            asyncio.run(streams(servers[0].url + "/completion", 1500, 16))  # about 5 s: two /slots readings
            for when in ("right after the direct client", "5 s later (control)"):
                if when.startswith("5 s"):
                    time.sleep(5)  # two more /slots readings see the server idle
                before = asyncio.run(waited(base))
                lat = asyncio.run(streams(base + "/olla/llamacpp/completion", 200, 16))
                queued = asyncio.run(waited(base)) - before
                print(f"round {round_ + 1}, olla {when}: p50 {statistics.median(lat) * 1000:.1f} ms, "
                      f"p99 {lat[int(len(lat) * 0.99)] * 1000:.1f} ms, max {lat[-1] * 1000:.1f} ms; "
                      f"{queued} of 200 waited in olla's slot queue", flush=True)  # fmt: skip

if __name__ == "__main__":
    main()
