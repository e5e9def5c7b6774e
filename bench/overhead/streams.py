"""Many streams: a thousand concurrent slow chats, direct to emulated endpoints and through olla, alternately.

The endpoints (`bench.overhead.stamped`, one process, four ports) stamp each
chunk with the moment it left; this process is the client and records, for
every chunk read inside the measuring window, how long it took to arrive. The
router's figure minus the direct one is what olla adds per chunk.
"""

from __future__ import annotations

import asyncio
import math
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import uvloop

from bench.common import ROOT, process, router_process, static_endpoints, usage, wait_discovered, wait_http
from bench.overhead.stamped import MODEL
from tests.llamacpp import free_port

ENDPOINTS = 4
STAMP = re.compile(rb'"sent_ns":(\d+)')
BODY = orjson.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                     "stream": True})  # fmt: skip


@dataclass
class Window:
    """Chunk delays (ms) read between `start` and `end` (monotonic ns), and streams that failed."""

    start: int
    end: int
    delays: list[float] = field(default_factory=list)
    failed: int = 0


@dataclass(frozen=True)
class Streams:
    target: str
    streams: int
    chunks: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    failed: int
    rss_mb: float | None = None  # the router's, sampled during the window
    cpu_per_s: float | None = None  # the router's CPU seconds per second of the window


async def _stream(port: int, path: str, window: Window) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    writer.write(f"{head}Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n".encode() + BODY)
    pending = b""
    done = False
    try:
        first = await reader.readuntil(b"\r\n")
        if not first.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(first.decode(errors="replace").strip())
        while data := await reader.read(65536):
            now = time.monotonic_ns()
            pending += data
            cut = pending.rfind(b"\n\n")
            if cut < 0:
                continue
            events, pending = pending[:cut], pending[cut + 2 :]
            if window.start <= now <= window.end:
                window.delays += ((now - int(m[1])) / 1e6 for m in STAMP.finditer(events))
            done = done or b"[DONE]" in events
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
        window.failed += not done


async def _run(ports: list[int], path: str, streams: int, ramp: float, seconds: float, pid: int | None) -> Streams:
    now = time.monotonic_ns()
    window = Window(now + int((ramp + 2) * 1e9), now + int((ramp + 2 + seconds) * 1e9))
    tasks = []
    for n in range(streams):
        tasks.append(asyncio.create_task(_stream(ports[n % len(ports)], path, window)))
        await asyncio.sleep(ramp / streams)
    rss: list[float] = []
    cpu = 0.0
    if pid is not None:
        await asyncio.sleep((window.start - time.monotonic_ns()) / 1e9)
        before = usage(pid).cpu
        while time.monotonic_ns() < window.end:
            rss.append(usage(pid).rss_mb)
            await asyncio.sleep(0.25)
        cpu = (usage(pid).cpu - before) / seconds
    await asyncio.gather(*tasks)
    delays = sorted(window.delays) or [math.nan]
    return Streams(
        "olla" if pid is not None else "direct", streams, len(window.delays), statistics.median(delays),
        delays[int(len(delays) * 0.99)], delays[-1], window.failed, max(rss) if rss else None,
        cpu if pid is not None else None,
    )  # fmt: skip


def measure(streams: int, rounds: int, seconds: float, interval: float, log: Path) -> tuple[list[Streams], float]:
    """Every round's direct and olla runs, and olla's peak RSS (MB) over the whole scenario."""
    ramp = max(2.0, streams / 250)
    chunks = math.ceil((ramp + seconds + 4) / interval)
    ports = [free_port() for _ in range(ENDPOINTS)]
    args = [sys.executable, "-m", "bench.overhead.stamped", "--interval", str(interval), "--chunks", str(chunks)]
    results = []
    with process([*args, *map(str, ports)], cwd=ROOT):
        for port in ports:
            asyncio.run(wait_http(f"http://127.0.0.1:{port}/health"))
        config = static_endpoints({f"slow-{n}": f"http://127.0.0.1:{p}" for n, p in enumerate(ports)})
        with router_process(config, log) as (base, router):
            asyncio.run(wait_discovered(base, ENDPOINTS))
            port = int(base.rsplit(":", 1)[1])
            for _ in range(rounds):
                for target in ("direct", "olla"):
                    if target == "direct":
                        run = uvloop.run(_run(ports, "/v1/chat/completions", streams, ramp, seconds, None))
                    else:
                        path = "/olla/llamacpp/v1/chat/completions"
                        run = uvloop.run(_run([port], path, streams, ramp, seconds, router.pid))
                    results.append(run)
                    print(f"{streams} streams {target:6} chunk delay p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms "
                          f"max {run.max_ms:.1f} ms, {run.chunks} chunks, {run.failed} failed, router RSS "
                          f"{run.rss_mb} MB CPU {run.cpu_per_s}", flush=True)  # fmt: skip
            peak = usage(router.pid).peak_rss_mb
    return results, peak
