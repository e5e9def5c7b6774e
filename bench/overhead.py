"""What the router adds: the same requests direct to an endpoint and through olla, side by side.

Each endpoint (a real llama-server on the tiny model, and the emulator) and the
router run as separate processes; the load generator is this process. Direct
and routed rounds alternate, so machine noise hits both alike; medians and
ratios are reported.

    .venv/bin/python -m bench.overhead [--rounds 5] [--requests 200] [--concurrency 1,16]

Writes bench/results/overhead.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import time
from collections.abc import Iterator

import aiohttp

from bench.common import RESULTS, process, router, wait_http
from tests.llamacpp import LlamaServers, ServerSpec, free_port, tiny_model

MODEL = "bench-model"

WORKLOADS = {
    "tokenize": ("/tokenize", {"content": "The quick brown fox jumps over the lazy dog."}),
    "completion": ("/completion", {"prompt": "Hello", "n_predict": 8}),
    "stream": ("/completion", {"prompt": "Hello", "n_predict": 32, "stream": True}),
}


@contextlib.contextmanager
def router_for(url: str) -> Iterator[str]:
    config = {
        "discovery": {"static": {"endpoints": [{"name": "bench", "url": url, "type": "llamacpp"}]}},
        "logging": {"level": "warning"},
    }
    with router(config) as base:
        asyncio.run(_wait_routable(base))
        yield base + "/olla/llamacpp"


async def _wait_routable(base: str) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(300):
            async with session.get(base + "/olla/llamacpp/v1/models") as r:
                if (await r.json())["data"]:
                    return
            await asyncio.sleep(0.05)
    raise TimeoutError("router never discovered the endpoint")


async def measure(base: str, path: str, body: dict, requests: int, concurrency: int) -> tuple[list[float], float]:
    """Per-request latency (to the last byte) and requests per second."""
    latencies: list[float] = []
    queue = iter(range(requests))
    # llama-server closes a connection after a streamed reply; say so up front, as olla does upstream.
    headers = {"Connection": "close"} if body.get("stream") else {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            for _ in queue:
                started = time.perf_counter()
                async with session.post(base + path, json=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"{base}{path}: {r.status}")
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return latencies, requests / elapsed


def compare(label: str, direct: str, routed: str, rounds: int, requests: int, levels: list[int]) -> list[str]:
    rows = []
    for name, (path, body) in WORKLOADS.items():
        for concurrency in levels:
            samples: dict[str, list[float]] = {"direct": [], "olla": []}
            rates: dict[str, list[float]] = {"direct": [], "olla": []}
            for _ in range(rounds):
                for who, base in (("direct", direct), ("olla", routed)):
                    lat, rate = asyncio.run(measure(base, path, body, requests, concurrency))
                    samples[who] += lat
                    rates[who].append(rate)
            p50 = {w: statistics.median(s) * 1000 for w, s in samples.items()}
            p99 = {w: statistics.quantiles(s, n=100)[98] * 1000 for w, s in samples.items()}
            rps = {w: statistics.median(r) for w, r in rates.items()}
            rows.append(
                f"| {label} | {name} | {concurrency} | {p50['direct']:.2f} | {p50['olla']:.2f} | "
                f"+{p50['olla'] - p50['direct']:.2f} | {p99['direct']:.2f} | {p99['olla']:.2f} | "
                f"{rps['direct']:.0f} | {rps['olla']:.0f} | {rps['olla'] / rps['direct']:.2f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    header = [
        "| endpoint | workload | concurrency | direct p50 ms | olla p50 ms | added p50 ms | direct p99 ms "
        "| olla p99 ms | direct req/s | olla req/s | olla/direct throughput |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(header))
    rows: list[str] = []
    sim_port = free_port()
    sim_args = [sys.executable, "-m", "olla", "sim", "--model", MODEL, "--slots", "16", "--port", str(sim_port),
                "--prefill-ms", "0", "--decode-ms", "0", "--host", "127.0.0.1"]  # fmt: skip
    with process(sim_args):
        sim_url = f"http://127.0.0.1:{sim_port}"
        asyncio.run(wait_http(sim_url + "/health"))
        with router_for(sim_url) as routed:
            rows += compare("emulator", sim_url, routed, args.rounds, args.requests, levels)
    spec = ServerSpec(model=tiny_model("chat"), alias=MODEL, slots=16, ctx_per_slot=256, threads=1)
    with LlamaServers([spec]) as servers, router_for(servers[0].url) as routed:
        rows += compare("llama-server", servers[0].url, routed, args.rounds, args.requests, levels)
    RESULTS.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.overhead " + " ".join(sys.argv[1:])
    text = "\n".join([
        "# Router overhead: direct vs through olla",
        "",
        f"Command: `{command.strip()}` ({args.rounds} alternating rounds of {args.requests} requests each;"
        " latency to the last byte; medians over all requests; req/s is the median round).",
        "",
        *header,
        *rows,
        "",
    ])  # fmt: skip
    (RESULTS / "overhead.md").write_text(text)


if __name__ == "__main__":
    main()
