"""Router overhead: direct vs a plain nginx reverse proxy vs olla, on the same machine in the same run.

    .venv/bin/python -m bench.overhead [--rounds 3] [--seconds 5] [--connections 1,16,64] [--streams 1000]

Needs Debian's nginx and wrk (apt-get install -y nginx wrk). Four scenarios:
throughput (wrk, interleaved rounds), floors (olla against a bare aiohttp proxy
and a bare asyncio one), many streams (1,000 slow streams, added per-chunk
delay, the router's memory and CPU) and startup (20 endpoints, spawn to first
routed 200). Writes bench/results/overhead.md (or --output).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import RESULTS, require
from bench.overhead import floors, startup, streams, throughput

CHAT_RATIO = 0.15
ADDED_P50_MS, ADDED_P99_MS = 0.35, 2.0
STREAMS_RSS_MB, CHUNK_P99_MS = 200, 2.0
STARTUP_S = 1.0


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def versions() -> str:
    nginx = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr.strip()
    wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.splitlines()[0].split(" [")[0]
    return f"{os.cpu_count()} CPUs, Python {platform.python_version()}, {nginx.removeprefix('nginx version: ')}, {wrk}"


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def throughput_targets(result: throughput.Throughput) -> list[str]:
    rows = []
    if (cell := result.cells.get(("chat", 16))) is not None:
        ratio = cell.median("olla", "rate") / cell.median("nginx", "rate")
        ok = ratio >= CHAT_RATIO and cell.errors("olla") == 0
        rows.append(f"| 16 connections, chat: olla req/s / nginx proxy req/s >= {CHAT_RATIO}, no errors "
                    f"| {ratio:.2f}, {cell.errors('olla')} errors | {verdict(ok)} |")  # fmt: skip
    if (cell := result.cells.get(("chat", 1))) is not None:
        p50 = cell.median("olla", "p50_ms") - cell.median("direct", "p50_ms")
        p99 = cell.median("olla", "p99_ms") - cell.median("direct", "p99_ms")
        for name, added, limit in (("p50", p50, ADDED_P50_MS), ("p99", p99, ADDED_P99_MS)):
            ok = verdict(added <= limit)
            rows.append(f"| 1 connection, chat: added {name} <= {limit:g} ms | {added:+.2f} ms | {ok} |")
    rows.append(f"| olla peak RSS over the throughput run | {result.peak_rss_mb:.0f} MB | - |")
    return rows


def streams_section(runs: list[streams.Streams], peak: float) -> tuple[list[str], list[str]]:
    table = [
        "| round | target | chunks measured | chunk delay p50 ms | p99 ms | max ms | failed streams "
        "| olla RSS MB | olla CPU s per s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for n, r in enumerate(runs):
        extra = f"{r.rss_mb:.0f} | {r.cpu_per_s:.2f}" if r.rss_mb is not None and r.cpu_per_s is not None else "- | -"
        table.append(f"| {n // 2 + 1} | {r.target} | {r.chunks} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.max_ms:.1f} "
                     f"| {r.failed} | {extra} |")  # fmt: skip
    direct = statistics.median(r.p99_ms for r in runs if r.target == "direct")
    routed = statistics.median(r.p99_ms for r in runs if r.target == "olla")
    failed = sum(r.failed for r in runs)
    n = runs[0].streams
    targets = [
        f"| {n} streams: olla RSS < {STREAMS_RSS_MB} MB | {peak:.0f} MB peak | {verdict(peak < STREAMS_RSS_MB)} |",
        # The whole delay through olla (emulator write to client read) bounds what olla adds; direct is the floor.
        f"| {n} streams: per-chunk delay through olla, p99 < {CHUNK_P99_MS:g} ms | {routed:.2f} ms (direct "
        f"{direct:.2f} ms; medians of rounds), {failed} failed streams "
        f"| {verdict(routed < CHUNK_P99_MS and failed == 0)} |",
    ]
    return table, targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved throughput rounds")
    parser.add_argument("--seconds", type=float, default=5, help="one wrk run")
    parser.add_argument("--connections", default="1,16,64")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--stream-rounds", type=int, default=3)
    parser.add_argument("--stream-seconds", type=float, default=15, help="measuring window of one streams round")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between an emulated stream's chunks")
    parser.add_argument("--startups", type=int, default=5)
    parser.add_argument("--skip", default="", help="comma-separated: throughput, floors, streams, startup")
    parser.add_argument("--output", type=Path, default=RESULTS / "overhead.md")
    args = parser.parse_args()
    require("nginx", "wrk")
    skip = set(filter(None, args.skip.split(",")))
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    loads = [f"start: {load()}"]
    body: list[str] = []
    targets = ["| target | measured | |", "| --- | --- | --- |"]
    with tempfile.TemporaryDirectory(prefix="olla-bench-") as directory:
        if "throughput" not in skip:
            levels = [int(c) for c in args.connections.split(",")]
            result = throughput.measure(args.rounds, args.seconds, levels, Path(directory) / "throughput.log")
            loads.append(f"after throughput: {load()}")
            targets += throughput_targets(result)
            body += [
                "## Throughput and latency",
                "",
                f"{args.rounds} rounds; in each, for every (workload, connections), wrk runs {args.seconds:g} s "
                "against direct, nginx, olla in turn. Medians over rounds; latency to the last byte; errors are wrk's "
                "socket errors plus non-2xx answers, summed. CPU is user + system seconds of the proxy's "
                f"process per 1,000 requests. olla wrote {result.log_lines} access-log lines.",
                "",
                *throughput.table(result),
                "",
            ]  # fmt: skip
        if "floors" not in skip:
            levels = [c for c in (1, 16) if str(c) in args.connections.split(",")] or [1]
            result = floors.run(args.rounds, args.seconds, levels, Path(directory) / "floors.log")
            loads.append(f"after floors: {load()}")
            body += [
                "## The floor: olla against proxies with no logic",
                "",
                "The non-streaming chat through four reference proxies (bench/overhead/floors.py), interleaved with "
                f"direct, the nginx proxy and olla ({args.rounds} rounds of {args.seconds:g} s, medians): *aiohttp* "
                "is a bare `web.Application` with one handler and one `ClientSession` on uvloop; "
                "*aiohttp-server+olla-client* is aiohttp's low-level `web.Server` (no application, router or "
                "middleware) forwarding with olla's own client (olla/http1.py), the least any use of aiohttp's "
                "server costs; *olla-server+olla-client* is olla's own server (olla/server.py) with one handler "
                "forwarding with olla's client, the HTTP stack olla is built on; "
                "*asyncio* is HTTP/1.1 keep-alive on asyncio protocols (uvloop), "
                "Content-Length bodies only. None of them routes, adds headers, counts or logs.",
                "",
                *floors.table(result, levels),
                "",
            ]  # fmt: skip
        if "streams" not in skip:
            runs, peak = streams.measure(args.streams, args.stream_rounds, args.stream_seconds, args.interval,
                                         Path(directory) / "streams.log")  # fmt: skip
            loads.append(f"after streams: {load()}")
            table, more = streams_section(runs, peak)
            targets += more
            body += [
                f"## {args.streams} concurrent streams",
                "",
                f"{args.streams} chats stream at once from 4 emulated endpoints (bench/overhead/stamped.py), one "
                f"chunk every {args.interval:g} s per stream; direct and through olla alternately. A chunk's delay "
                "runs from the emulator stamping it just before its write to this client reading it. RSS is "
                f"sampled during the {args.stream_seconds:g} s window; CPU is over the window.",
                "",
                *table,
                "",
            ]  # fmt: skip
        if "startup" not in skip:
            seconds = startup.measure(args.startups)
            targets.append(f"| startup to first routed request, {startup.ENDPOINTS} endpoints, < {STARTUP_S:g} s "
                           f"| {startup.summary(seconds)} | {verdict(max(seconds) < STARTUP_S)} |")  # fmt: skip
            body += ["## Startup", "", f"`olla serve` with {startup.ENDPOINTS} endpoints (one nginx on 20 ports), "
                     "from spawning the process to the first 200 routed through it: "
                     + ", ".join(f"{s:.3f}" for s in seconds) + " s.", ""]  # fmt: skip
    command = "python -m bench.overhead " + " ".join(sys.argv[1:])
    text = [
        "# Router overhead: direct vs nginx reverse proxy vs olla",
        "",
        f"Command: `{command.strip()}` (nginx and wrk from Debian: `apt-get install -y nginx wrk`). "
        f"Run {began} on {versions()}; {'; '.join(loads)}. The machine is shared: other work ran alongside, "
        "hence interleaved rounds, medians and ratios.",
        "",
        "Upstreams: nginx answering a fixed llama.cpp chat reply (chat); `olla sim` sending 100 small SSE "
        "chunks with no decode time (stream). The nginx proxy keeps connections alive to its upstream "
        "(`proxy_buffering off` for streams). olla runs `python -m olla serve` with its default config "
        "(metrics on, JSON access log to a file). Where the time goes, and the earlier p99 anomaly: "
        "[overhead-notes.md](overhead-notes.md).",
        "",
        "## Targets",
        "",
        *targets,
        "",
        *body,
    ]  # fmt: skip
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(text))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
