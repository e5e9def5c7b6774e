"""One chaos run: an emulated fleet, a real router in front of it, clients and the adversary.

The fleet, the clients and the adversary share this process (the adversary
flips faults on the fleet's servers directly, and every time is on one clock);
the router is `python -m olla serve` in a child process, whose memory is read
from /proc. The run lasts `duration`; then faults are cleared, the clients'
last requests end, and the harness waits for quiet before reading what is left
busy on both sides.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.chaos.adversary import Adversary
from bench.chaos.clients import ClientPool, Result
from bench.chaos.timeline import Timeline
from bench.chaos.verdict import Criterion, Leftover, Memory, classify, criteria, tally
from bench.common import process, wait_http
from olla.sim import SimConfig, SimFleet, SimServer
from tests.llamacpp import free_port

FLEET = {
    f"{model}-{i}": SimConfig(model=model, slots=4, prefill_ms=0.2, decode_ms=15.0, load_seconds=1.0)
    for model in ("chat", "code")
    for i in (1, 2, 3)
}
PROXY = {"response_timeout": "20s", "read_timeout": "4s", "header_timeout": "3s", "connection_timeout": "2s",
         "queue": {"timeout": "10s"}}  # fmt: skip
CHECKS = {"check_interval": "1s", "check_timeout": "500ms"}
RESPONSE_TIMEOUT = 20.0  # PROXY's, in seconds
CLIENT_TIMEOUT = RESPONSE_TIMEOUT + 10.0  # a client's own limit: the router should always answer first
SETTLE = 8.0  # seconds after a fault ends before its endpoint counts as healthy again (see timeline)
QUIET_TIMEOUT = 30.0
SAMPLE_SECONDS = 1.0
WATCH_SECONDS = 0.25


@dataclass(frozen=True)
class Options:
    duration: float = 600.0
    seed: int = 1
    clients: int = 16
    pace: float = 2.0  # mean seconds between two adversary actions
    warmup: float = 0.2  # share of the run before the memory baseline is taken


@dataclass
class Run:
    options: Options
    results: list[Result]
    verdicts: list[str]
    timeline: Timeline
    skipped: int  # adversary draws that found nothing it was allowed to act on
    memory: Memory
    leftover: Leftover
    health: dict[str, str]  # endpoint: the router's view once quiet
    cpu: dict[str, float]  # CPU seconds during the run: router, harness
    watch: Watch
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at the start and at the end
    router_log: dict[str, Any] = field(default_factory=dict)
    wall: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = dict(tally(self.verdicts))

    @property
    def criteria(self) -> list[Criterion]:
        return criteria(self.counts, self.leftover, self.memory, self.timeline.count())

    @property
    def passed(self) -> bool:
        return all(c.met for c in self.criteria)


def run(options: Options) -> Run:
    return asyncio.run(_run(options))


def router_config(port: int, urls: Mapping[str, str]) -> dict[str, Any]:
    endpoints = [{"name": name, "url": url, **CHECKS} for name, url in urls.items()]
    return {
        "server": {"host": "127.0.0.1", "port": port, "shutdown_timeout": "1s"},
        "proxy": PROXY,
        "discovery": {"slots_interval": "1s", "static": {"endpoints": endpoints}},
        "logging": {"level": "warning"},
    }


async def _run(options: Options) -> Run:
    began = time.monotonic()
    load_start = os.getloadavg()[0]
    async with SimFleet(FLEET.values()) as fleet:
        servers = dict(zip(FLEET, fleet.servers, strict=True))
        with tempfile.TemporaryDirectory(prefix="olla-chaos-") as directory:
            config, log_path, port = Path(directory) / "chaos.yaml", Path(directory) / "router.log", free_port()
            config.write_text(yaml.safe_dump(router_config(port, dict(zip(FLEET, fleet.urls, strict=True)))))
            args = [sys.executable, "-m", "olla", "serve", "-c", str(config)]
            with log_path.open("wb") as log, process(args, stdout=log, stderr=subprocess.STDOUT) as router:
                result = await _chaos(options, f"http://127.0.0.1:{port}", router.pid, servers)
            result.router_log = read_log(log_path)
    result.load = (load_start, os.getloadavg()[0])
    result.wall = time.monotonic() - began
    return result


async def _chaos(options: Options, base: str, pid: int, servers: dict[str, SimServer]) -> Run:
    await wait_http(base + "/internal/health")
    async with aiohttp.ClientSession() as session:
        await _wait_ready(session, base)
        timeline = Timeline({name: config.model for name, config in FLEET.items()}, SETTLE, RESPONSE_TIMEOUT)
        adversary = Adversary(servers, timeline, random.Random(options.seed), options.pace)
        models = sorted(set(timeline.models.values()))
        pool = ClientPool(base, models, options.clients, options.seed, CLIENT_TIMEOUT)
        started = time.monotonic()
        until = started + options.duration
        meter, watch = Meter(pid, started), Watch(session, base, started, servers)
        sampling, watching = asyncio.create_task(meter.run()), asyncio.create_task(watch.run())
        try:
            clients = asyncio.create_task(pool.run(until))
            await adversary.run(until)
            await adversary.stop()
            await clients
            leftover = await _quiesce(session, base, servers)
        finally:
            sampling.cancel()
            watching.cancel()
            await asyncio.gather(sampling, watching, return_exceptions=True)
        meter.sample()
        health = {e["name"]: e["status"] for e in await _get(session, base + "/internal/status/endpoints", "endpoints")}
    memory = Memory(meter.samples, options.warmup * options.duration)
    verdicts = classify(pool.results, timeline)
    return Run(
        options, pool.results, verdicts, timeline, adversary.skipped, memory, leftover, health, meter.cpu(), watch
    )


async def _get(session: aiohttp.ClientSession, url: str, key: str) -> list[dict[str, Any]]:
    async with session.get(url) as response:
        listing: list[dict[str, Any]] = (await response.json())[key]
        return listing


async def _wait_ready(session: aiohttp.ClientSession, base: str, timeout: float = 30.0) -> None:
    """Every endpoint healthy, with its model discovered."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        endpoints = await _get(session, base + "/internal/status/endpoints", "endpoints")
        if len(endpoints) == len(FLEET) and all(e["status"] == "healthy" and e["models"] for e in endpoints):
            return
        await asyncio.sleep(0.1)
    raise TimeoutError("the router never found every endpoint healthy")


async def _quiesce(session: aiohttp.ClientSession, base: str, servers: dict[str, SimServer]) -> Leftover:
    """Wait until nothing is busy anywhere (or QUIET_TIMEOUT), then say what is left."""
    began = time.monotonic()
    while True:
        endpoints = await _get(session, base + "/internal/status/endpoints", "endpoints")
        models = await _get(session, base + "/internal/status/models", "models")
        busy = unread = 0
        for server in servers.values():
            async with session.get(server.url + "/slots") as response:
                listing = await response.json()  # a 503 while a restarted endpoint loads: read it again
            if response.status == 200:
                busy += sum(1 for s in listing if s.get("is_processing"))
            else:
                unread += 1
        waited = time.monotonic() - began
        left = Leftover(
            sum(e["in_flight"] for e in endpoints), sum(e["busy_slots"] for e in endpoints),
            sum(m["queue"]["length"] for m in models), busy, sum(s.waiting for s in servers.values()), unread, waited,
        )  # fmt: skip
        if left.total == 0 or waited > QUIET_TIMEOUT:
            return left
        await asyncio.sleep(0.5)


class Meter:
    """The router's resident memory every SAMPLE_SECONDS, and the CPU time both processes used."""

    def __init__(self, pid: int, started: float) -> None:
        self.pid = pid
        self.started = started
        self.samples: list[tuple[float, int]] = []
        self._cpu_start = (self._router_cpu(), time.process_time())
        self.sample()

    def sample(self) -> None:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                self.samples.append((time.monotonic() - self.started, int(line.split()[1])))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_SECONDS)
            self.sample()

    def cpu(self) -> dict[str, float]:
        return {"router": self._router_cpu() - self._cpu_start[0], "harness": time.process_time() - self._cpu_start[1]}

    def _router_cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def read_log(path: Path) -> dict[str, Any]:
    """The router's log lines per level, and the first few above warning."""
    levels: dict[str, int] = {}
    problems: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
            level, message = str(entry.get("level", "?")), str(entry.get("message", ""))
        except json.JSONDecodeError:
            level, message = "unstructured", line
        levels[level] = levels.get(level, 0) + 1
        if level not in ("debug", "info", "warning") and len(problems) < 5:
            problems.append(message[:300])
    return {"levels": levels, "problems": problems}


class Watch:
    """Polled: each change of the router's view of an endpoint, requests waiting inside endpoints, this loop's lag."""

    def __init__(
        self, session: aiohttp.ClientSession, base: str, started: float, servers: dict[str, SimServer]
    ) -> None:
        self.session = session
        self.base = base
        self.started = started
        self.servers = servers
        self.changes: list[tuple[float, str, str, str]] = []  # seconds since the start, endpoint, status, detail
        self.waiting: list[tuple[float, str, int]] = []  # seconds since the start, endpoint, requests it queued
        self.lags: list[float] = []  # how late this process's loop woke up, seconds
        self._last: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            asleep = time.monotonic()
            await asyncio.sleep(WATCH_SECONDS)
            now = time.monotonic()
            self.lags.append(now - asleep - WATCH_SECONDS)
            self.waiting += [(now - self.started, name, s.waiting) for name, s in self.servers.items() if s.waiting]
            for e in await _get(self.session, self.base + "/internal/status/endpoints", "endpoints"):
                if self._last.get(e["name"]) != e["status"]:
                    self._last[e["name"]] = e["status"]
                    self.changes.append((now - self.started, e["name"], e["status"], e["detail"]))
