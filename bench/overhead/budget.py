"""Where olla's CPU per request goes: olla beside variants of it with one layer or feature taken out.

    python -m bench.overhead.budget [--rounds 5] [--seconds 4] [--connections 16] [--output FILE]

It writes bench/results/budget.md unless `--output` names another file.

Every variant forwards the benchmark's non-streaming chat (bench/overhead/throughput.py) to one nginx
upstream; rounds interleave the variants (A B C ... A B C); the table shows medians of req/s and of the
process's CPU (user + system) per request, and each variant's difference to olla. olla is CPU-bound on
one core at 16 connections, so CPU per request is what sets its throughput.

- `olla`: `olla serve`, default config (metrics on, JSON access log to a file);
- `access log off`: `logging.level: warning`;
- `priority balancer`: `proxy.load_balancer: priority` (no slot queue, no affinity);
- `olla's app, minimal forward`: olla's server, its front (exchange, admission, dispatch), access log and
  metrics, with the proxy's handler replaced by a forward of the body to the endpoint (no routing, queue,
  affinity, header rules or deadline). This module starts it (`python -m bench.overhead.budget shell
  CONFIG`): it replaces `Proxy.handle` and runs `olla serve`. A measuring device, not a mode of olla;
- `olla-server+olla-client`, `aiohttp-server+olla-client`: two reference proxies of floors.py.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    process,
    require,
    static_endpoints,
    usage,
    wait_discovered,
    wait_http,
)
from bench.overhead.nginx import endpoint_locations, nginx
from bench.overhead.throughput import CHAT_MODEL, WORKLOADS
from bench.overhead.wrk import wrk
from tests.llamacpp import free_port

PATH = "/olla/llamacpp/v1/chat/completions"
OLLA_VARIANTS: dict[str, dict[str, Any]] = {
    "olla": {},
    "access log off": {"logging": {"level": "warning"}},
    "priority balancer": {"proxy": {"load_balancer": "priority"}},
    "olla's app, minimal forward": {},
}
FLOORS = ("olla-server+olla-client", "aiohttp-server+olla-client")


def shell(config: str) -> int:
    """`olla serve` with the proxy's handler replaced by a minimal forward to the first endpoint."""
    from bench.overhead.floors import forward
    from olla.cli import main
    from olla.exchange import Exchange
    from olla.messages import Request, Response
    from olla.profiles import Profile
    from olla.proxy import Proxy

    async def minimal(self: Proxy, request: Request, exchange: Exchange, profile: Profile, path: str) -> Response:
        return await forward(self.upstream.client, next(iter(self.registry)).config.url.rstrip("/"), request)

    Proxy.handle = minimal  # type: ignore[method-assign]
    return main(["serve", "-c", config])


def start(stack: ExitStack, index: int, name: str, upstream: int, directory: Path) -> tuple[str, int]:
    """One variant running; its chat URL and pid."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    if name in FLOORS:
        proc = stack.enter_context(process([sys.executable, "-m", "bench.overhead.floors", name, str(upstream),
                                            str(port)]))  # fmt: skip
        asyncio.run(wait_http(base + "/olla/llamacpp/health"))
        return base + PATH, proc.pid
    config = static_endpoints({"nginx": f"http://127.0.0.1:{upstream}"})
    config["server"] = {"host": "127.0.0.1", "port": port}
    for section, settings in OLLA_VARIANTS[name].items():
        config[section] = {**config.get(section, {}), **settings}
    path = directory / f"variant{index}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = stack.enter_context((directory / f"{path.stem}.log").open("wb"))
    shelled = name == "olla's app, minimal forward"
    command = ["-m", "bench.overhead.budget", "shell"] if shelled else ["-m", "olla", "serve", "-c"]
    proc = stack.enter_context(process([sys.executable, *command, str(path)], stdout=log, stderr=log))
    asyncio.run(wait_http(base + "/internal/health"))
    asyncio.run(wait_discovered(base, 1))
    return base + PATH, proc.pid


def measure(rounds: int, seconds: float, connections: int) -> dict[str, list[tuple[float, float, int]]]:
    """(req/s, CPU µs per request, errors) per variant and round."""
    names = [*OLLA_VARIANTS, *FLOORS]
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name in names}
    with ExitStack() as stack, tempfile.TemporaryDirectory() as directory:
        upstream = free_port()
        stack.enter_context(nginx([([upstream], endpoint_locations(CHAT_MODEL))]))
        asyncio.run(wait_http(f"http://127.0.0.1:{upstream}/health"))
        running = {name: start(stack, i, name, upstream, Path(directory)) for i, name in enumerate(names)}
        for url, _ in running.values():
            wrk(url, WORKLOADS["chat"], 4, 1)  # warm-up
        for round_ in range(rounds):
            for name, (url, pid) in running.items():
                before = usage(pid).cpu
                run = wrk(url, WORKLOADS["chat"], connections, seconds)
                cpu = (usage(pid).cpu - before) / max(run.requests, 1) * 1e6
                results[name].append((run.rate, cpu, run.errors))
                print(f"round {round_ + 1} {name:30} {run.rate:7.0f} req/s {cpu:6.0f} µs/request", flush=True)
    return results


def table(results: dict[str, list[tuple[float, float, int]]]) -> list[str]:
    olla = statistics.median(cpu for _, cpu, _ in results["olla"])
    rows = ["| variant | req/s | CPU µs per request | vs olla µs | errors |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, runs in results.items():
        rate, cpu = statistics.median(r for r, _, _ in runs), statistics.median(c for _, c, _ in runs)
        rows.append(f"| {name} | {rate:.0f} | {cpu:.0f} | {cpu - olla:+.0f} | {sum(e for _, _, e in runs)} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead.budget", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--output", type=Path, default=Path(__file__).parents[1] / "results" / "budget.md")
    args = parser.parse_args(argv)
    require("nginx", "wrk")
    results = measure(args.rounds, args.seconds, args.connections)
    command = f"python -m bench.overhead.budget --rounds {args.rounds} --seconds {args.seconds:g} --connections {args.connections}"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    lines = ["# Where olla's CPU per request goes", "",
             (f"Command: `{command}`. Run {when} on {os.cpu_count()} CPUs, load average {load} at the end; medians "
              "over rounds. What each variant is: the module docstring of bench/overhead/budget.py. "
              "Interpretation: [overhead-notes.md](overhead-notes.md), sections \"The budget\" and "
              "\"olla's own server\"."),
             "", *table(results)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.write_text(text)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["shell"]:
        sys.exit(shell(sys.argv[2]))
    sys.exit(main())
