"""What the benchmarks share: where results go, child processes, a router to measure, and its CPU and memory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.llamacpp import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TICK = os.sysconf("SC_CLK_TCK")


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise TimeoutError(url)


def require(*commands: str) -> None:
    """Exit with the install command when a tool the benchmark runs is missing."""
    missing = [c for c in commands if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]
    if missing:
        sys.exit(f"this benchmark needs {', '.join(missing)}: apt-get update && apt-get install -y {' '.join(missing)}")


@contextlib.contextmanager
def process(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """A child process, silent unless `popen` says otherwise; terminated (then killed) when the block ends."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(args, **popen)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@dataclass(frozen=True)
class Usage:
    """A process's CPU seconds (user + system) so far, its resident memory now, and its peak."""

    cpu: float
    rss_mb: float
    peak_rss_mb: float


def usage(pid: int) -> Usage:
    """The process and its children (nginx's master does no work; its worker does)."""
    pids = [pid, *map(int, Path(f"/proc/{pid}/task/{pid}/children").read_text().split())]
    cpu = rss = peak = 0.0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        cpu += (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
        status = dict(line.split(":", 1) for line in Path(f"/proc/{p}/status").read_text().splitlines())
        rss += _kb(status["VmRSS"]) / 1024
        peak += _kb(status["VmHWM"]) / 1024
    return Usage(cpu, rss, peak)


def _kb(value: str) -> int:
    return int(value.split()[0])


@contextlib.contextmanager
def router_process(config: dict[str, Any], log: Path | None = None) -> Iterator[tuple[str, subprocess.Popen[Any]]]:
    """`python -m olla serve` with this config on a free loopback port, its log to `log` (or nowhere);
    yields its base URL and process once it answers."""
    port = free_port()
    server = {**config.get("server", {}), "host": "127.0.0.1", "port": port}
    with tempfile.TemporaryDirectory() as directory, contextlib.ExitStack() as stack:
        path = Path(directory) / "bench.yaml"
        path.write_text(yaml.safe_dump({**config, "server": server}))
        out = stack.enter_context(log.open("ab")) if log else subprocess.DEVNULL
        args = [sys.executable, "-m", "olla", "serve", "-c", str(path)]
        proc = stack.enter_context(process(args, stdout=out, stderr=subprocess.STDOUT if log else subprocess.DEVNULL))
        base = f"http://127.0.0.1:{port}"
        asyncio.run(wait_http(base + "/internal/health"))
        yield base, proc


@contextlib.contextmanager
def router(config: dict[str, Any]) -> Iterator[str]:
    """`python -m olla serve` with this config on a free loopback port; yields its base URL once it answers."""
    with router_process(config) as (base, _):
        yield base


def static_endpoints(urls: dict[str, str]) -> dict[str, Any]:
    """A router config with these endpoints (name -> url) and every other key at its default."""
    endpoints = [{"name": n, "url": u, "type": "llamacpp"} for n, u in urls.items()]
    return {"discovery": {"static": {"endpoints": endpoints}}}


async def wait_discovered(base: str, endpoints: int, timeout: float = 30.0) -> None:
    """Until the router at `base` has `endpoints` healthy endpoints with their models discovered."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            async with session.get(base + "/internal/status/endpoints") as r:
                found = (await r.json())["endpoints"]
            if sum(e["status"] == "healthy" and bool(e["models"]) for e in found) >= endpoints:
                return
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{base} did not discover {endpoints} endpoint(s)")
