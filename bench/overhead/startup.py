"""Startup: from starting `olla serve` with 20 endpoints configured to its first routed 200.

The endpoints are one nginx answering on 20 ports (bench.overhead.nginx). The
clock starts before the process is spawned, so interpreter start, imports,
config validation, the first probes and discovery all count.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import yaml

from bench.common import process, static_endpoints, wait_http
from bench.overhead.nginx import endpoint_locations, nginx
from bench.overhead.throughput import CHAT_MODEL, CHAT_PATH, WORKLOADS
from tests.llamacpp import free_port

ENDPOINTS = 20


async def _first_routed(url: str, deadline: float) -> None:
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.post(url, json=WORKLOADS["chat"]) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.005)
    raise TimeoutError(f"{url} never answered 200")


def measure(runs: int) -> list[float]:
    """Seconds from spawning the router to its first routed 200, once per run."""
    ports = [free_port() for _ in range(ENDPOINTS)]
    seconds = []
    with nginx([(ports, endpoint_locations(CHAT_MODEL))]), tempfile.TemporaryDirectory() as directory:
        asyncio.run(wait_http(f"http://127.0.0.1:{ports[-1]}/health"))
        for _ in range(runs):
            port = free_port()
            config = static_endpoints({f"e{n:02}": f"http://127.0.0.1:{p}" for n, p in enumerate(ports)})
            path = Path(directory) / "startup.yaml"
            path.write_text(yaml.safe_dump({**config, "server": {"host": "127.0.0.1", "port": port}}))
            started = time.monotonic()
            with process([sys.executable, "-m", "olla", "serve", "-c", str(path)]):
                url = f"http://127.0.0.1:{port}/olla/llamacpp{CHAT_PATH}"
                asyncio.run(_first_routed(url, started + 30))
                seconds.append(time.monotonic() - started)
            print(f"startup with {ENDPOINTS} endpoints: {seconds[-1]:.3f} s", flush=True)
    return seconds


def summary(seconds: list[float]) -> str:
    return f"median {statistics.median(seconds):.2f} s, worst {max(seconds):.2f} s over {len(seconds)} starts"
