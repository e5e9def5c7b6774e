"""Requests per second and latency: direct, through nginx, through olla, interleaved round by round.

Non-streaming chats go to nginx answering a fixed llama.cpp reply; streaming
chats to `olla sim` sending 100 small SSE chunks (no decode time). The three
targets of one (workload, connections) run back to back in every round, so
noise hits all three alike; the table shows medians over rounds.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import process, router_process, static_endpoints, usage, wait_discovered, wait_http
from bench.overhead.nginx import SLOTS, endpoint_locations, nginx, proxy_locations
from bench.overhead.wrk import Run, wrk
from tests.llamacpp import free_port

TARGETS = ("direct", "nginx", "olla")
CHAT_MODEL = "bench-chat"
STREAM_MODEL = "bench-stream"
PROMPT = [{"role": "system", "content": "You are a helpful assistant."},
          {"role": "user", "content": "Write one sentence about foxes."}]  # fmt: skip
WORKLOADS = {
    "chat": {"model": CHAT_MODEL, "messages": PROMPT, "max_tokens": 10},
    "stream": {"model": STREAM_MODEL, "messages": PROMPT, "max_tokens": 100, "stream": True},
}
CHAT_PATH = "/v1/chat/completions"
# llama-server (and olla sim) close the connection after a streamed reply without saying so, which wrk
# counts as a read error; a client that says `Connection: close` up front gets a clean close from all three.
HEADERS = {"chat": {}, "stream": {"Connection": "close"}}


@dataclass
class Cell:
    """One (workload, connections): every round's wrk run per target, and olla's and nginx's CPU per request."""

    runs: dict[str, list[Run]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    cpu_per_1k: dict[str, list[float]] = field(default_factory=lambda: {"nginx": [], "olla": []})

    def median(self, target: str, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs[target])

    def errors(self, target: str) -> int:
        return sum(r.errors for r in self.runs[target])


@dataclass
class Throughput:
    cells: dict[tuple[str, int], Cell]
    peak_rss_mb: float
    log_lines: int


@contextmanager
def targets(log: Path) -> Iterator[tuple[dict[str, dict[str, str]], dict[str, int]]]:
    """The upstreams, nginx proxy and router running; yields URL per workload and target, and their pids."""
    chat, chat_proxy, stream_proxy, sim = (free_port() for _ in range(4))
    sim_args = [sys.executable, "-m", "olla", "sim", "--model", STREAM_MODEL, "--slots", str(SLOTS),
                "--prefill-ms", "0", "--decode-ms", "0", "--n-predict", "100", "--port", str(sim),
                "--no-slots"]  # fmt: skip
    # --no-slots: with /slots readable, olla counts the direct rounds' requests as another client's
    # load for up to discovery.slots_interval and queues its own (bench/results/overhead.md, the anomaly).
    with ExitStack() as stack:
        stack.enter_context(nginx([([chat], endpoint_locations(CHAT_MODEL))]))
        stack.enter_context(process(sim_args))
        proxy = stack.enter_context(nginx(
            [([chat_proxy], proxy_locations("chat", False)), ([stream_proxy], proxy_locations("stream", True))],
            {"chat": chat, "stream": sim},
        ))  # fmt: skip
        for port in (chat, sim, chat_proxy, stream_proxy):
            asyncio.run(wait_http(f"http://127.0.0.1:{port}/health"))
        config = static_endpoints({"nginx": f"http://127.0.0.1:{chat}", "sim": f"http://127.0.0.1:{sim}"})
        base, router = stack.enter_context(router_process(config, log))
        asyncio.run(wait_discovered(base, 2))
        routed = base + "/olla/llamacpp" + CHAT_PATH
        urls = {
            "chat": {"direct": f"http://127.0.0.1:{chat}{CHAT_PATH}",
                     "nginx": f"http://127.0.0.1:{chat_proxy}{CHAT_PATH}", "olla": routed},
            "stream": {"direct": f"http://127.0.0.1:{sim}{CHAT_PATH}",
                       "nginx": f"http://127.0.0.1:{stream_proxy}{CHAT_PATH}", "olla": routed},
        }  # fmt: skip
        yield urls, {"nginx": proxy.pid, "olla": router.pid}


def measure(rounds: int, seconds: float, connections: list[int], log: Path) -> Throughput:
    cells = {(w, c): Cell() for w in WORKLOADS for c in connections}
    with targets(log) as (urls, pids):
        for workload, body in WORKLOADS.items():  # warm-up: connection pools, imports, caches
            for url in urls[workload].values():
                wrk(url, body, 4, 1, HEADERS[workload])
        for round_ in range(rounds):
            for (workload, conns), cell in cells.items():
                for target in TARGETS:
                    before = usage(pids[target]).cpu if target in pids else 0.0
                    run = wrk(urls[workload][target], WORKLOADS[workload], conns, seconds, HEADERS[workload])
                    cell.runs[target].append(run)
                    if target in pids:
                        cell.cpu_per_1k[target].append((usage(pids[target]).cpu - before) / max(run.requests, 1) * 1000)
                    print(f"round {round_ + 1} {workload:6} c={conns:<3} {target:6} {run.rate:8.0f} req/s p50 "
                          f"{run.p50_ms:7.2f} ms p99 {run.p99_ms:7.2f} ms errors {run.errors}", flush=True)  # fmt: skip
        peak = usage(pids["olla"]).peak_rss_mb
    return Throughput(cells, peak, sum(1 for _ in log.open("rb")))


def table(result: Throughput) -> list[str]:
    rows = [
        "| workload | conns | direct req/s | nginx req/s | olla req/s | **olla / nginx** | direct p50 ms "
        "| nginx p50 ms | olla p50 ms | **olla added p50 ms** | direct p99 ms | nginx p99 ms | olla p99 ms "
        "| **olla added p99 ms** | errors direct / nginx / olla | nginx CPU s per 1k req | olla CPU s per 1k req |",
        "|" + " --- |" * 17,
    ]
    for (workload, conns), cell in result.cells.items():
        rate = {t: cell.median(t, "rate") for t in TARGETS}
        p50 = {t: cell.median(t, "p50_ms") for t in TARGETS}
        p99 = {t: cell.median(t, "p99_ms") for t in TARGETS}
        cpu = {t: statistics.median(v) for t, v in cell.cpu_per_1k.items()}
        rows.append(
            f"| {workload} | {conns} | {rate['direct']:.0f} | {rate['nginx']:.0f} | {rate['olla']:.0f} "
            f"| **{rate['olla'] / rate['nginx']:.2f}** | {p50['direct']:.2f} | {p50['nginx']:.2f} | {p50['olla']:.2f} "
            f"| **{p50['olla'] - p50['direct']:+.2f}** | {p99['direct']:.2f} | {p99['nginx']:.2f} | {p99['olla']:.2f} "
            f"| **{p99['olla'] - p99['direct']:+.2f}** | {cell.errors('direct')} / {cell.errors('nginx')} / "
            f"{cell.errors('olla')} | {cpu['nginx']:.3f} | {cpu['olla']:.3f} |"
        )
    return rows

