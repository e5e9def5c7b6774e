"""Balancers side by side on an emulated fleet, each on the same arrival trace.

Six emulated llama-servers run in one helper process (this module with
--serve-fleet), olla in another, and the load generator in this one. For each
load level and balancer the fleet and the router start afresh (cold KV caches,
no remembered conversations) and replay the same precomputed trace: multi-turn
chats sharing a long system prompt, and one-shot prompts.

Capacity, per model: the sum over its endpoints of slots / (mean output tokens x
decode_ms + mean uncached prompt tokens x prefill_ms), assuming every chat turn
re-processes only what its conversation's previous turn did not leave in the
KV cache (the first turn: all but the shared system prompt) and one-shots are
processed in full. The fleet's capacity is the arrival rate at which the first
model's pool is full; a load level is a fraction of it.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python -m bench.routing [--duration 40] [--quick]

Writes bench/results/routing.md and routing.png (--quick writes to a temporary directory).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import math
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.common import RESULTS, ROOT, process, router
from olla.sim import SimConfig, SimFleet, SimServer
from olla.sim.slots import common_prefix
from olla.sim.tokens import chat_prompt, tokenize

CHAT, CODE = "chat", "code"
FAST = {"slots": 4, "prefill_ms": 0.3, "decode_ms": 15.0}
SLOW = {"slots": 2, "prefill_ms": 1.0, "decode_ms": 40.0}
N_CTX = 8192  # a six-turn conversation is about 4k tokens
FLEET = {
    "fast-1": SimConfig(model=CHAT, n_ctx=N_CTX, **FAST),
    "fast-2": SimConfig(model=CHAT, n_ctx=N_CTX, **FAST),
    "slow-1": SimConfig(model=CHAT, n_ctx=N_CTX, **SLOW),
    "slow-2": SimConfig(model=CHAT, n_ctx=N_CTX, **SLOW),
    "slow-3": SimConfig(model=CODE, n_ctx=N_CTX, **SLOW),
    "slow-4": SimConfig(model=CODE, n_ctx=N_CTX, **SLOW),
}
SETUPS = {  # label: (proxy.load_balancer, proxy.affinity.enabled)
    "round-robin": ("round-robin", False),
    "least-connections": ("least-connections", False),
    "slot-aware": ("slot-aware", False),
    "slot-aware+affinity": ("slot-aware", True),
}
BASELINE = "least-connections"
LEVELS = (0.70, 0.95)

CHAT_SHARE = 0.70  # of arrivals: chat turns on CHAT; the rest are one-shots
ONE_SHOT_ON_CODE = 0.40  # of one-shots; with this split both pools fill at about the same rate
LANES = 16  # conversations in progress at once, more than CHAT's 12 slots: caches are contended
TURNS = (3, 6)
SYSTEM_CHARS = 1500
USER_CHARS = (150, 300)
ONE_SHOT_CHARS = (400, 800)
MAX_TOKENS = (24, 56)
ALPHABET = string.ascii_lowercase + " " * 6 + ",."
CAPACITY_SAMPLE = 5000  # arrivals the capacity means are taken over
MAX_ARRIVALS = 100_000
SAMPLE_SECONDS = 0.005  # how often the fleet process looks for requests waiting on an endpoint
PATH = "/olla/llamacpp/v1/chat/completions"


# --- the workload ------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    id: int
    at: float  # seconds after the start
    model: str
    text: str  # the user message
    max_tokens: int
    session: int | None = None  # None: a one-shot


def system_prompt(seed: int) -> str:
    return _text(random.Random(f"{seed}:system"), SYSTEM_CHARS)


def arrivals(seed: int) -> Iterator[Request]:
    """The workload at one arrival per second on average; `trace` scales it to a rate."""
    rng = random.Random(seed)
    lanes = [(-1, 0)] * LANES  # (session, turns left)
    sessions = itertools.count()
    at = 0.0
    for i in range(MAX_ARRIVALS):
        at += rng.expovariate(1.0)
        max_tokens = rng.randint(*MAX_TOKENS)
        if rng.random() < CHAT_SHARE:
            lane = rng.randrange(LANES)
            session, left = lanes[lane]
            if left == 0:
                session, left = next(sessions), rng.randint(*TURNS)
            lanes[lane] = (session, left - 1)
            yield Request(i, at, CHAT, _text(rng, rng.randint(*USER_CHARS)), max_tokens, session)
        else:
            model = CODE if rng.random() < ONE_SHOT_ON_CODE else CHAT
            yield Request(i, at, model, _text(rng, rng.randint(*ONE_SHOT_CHARS)), max_tokens)


def trace(seed: int, rate: float, duration: float) -> list[Request]:
    scaled = (replace(r, at=r.at / rate) for r in arrivals(seed))
    return list(itertools.takewhile(lambda r: r.at < duration, scaled))


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _prompt(messages: list[dict[str, str]]) -> list[int]:
    return tokenize(chat_prompt(messages), add_bos=True)


# --- capacity ----------------------------------------------------------------------


@dataclass(frozen=True)
class Capacity:
    share: dict[str, float]  # of arrivals
    output: dict[str, float]  # mean output tokens
    uncached: dict[str, float]  # mean prompt tokens to process, conversations cached
    cold: dict[str, float]  # the same with only the shared system prompt cached
    pool: dict[str, float]  # requests/s, conversations cached
    pool_cold: dict[str, float]
    fleet: float  # arrivals/s at which the first pool is full
    fleet_cold: float


def capacity(seed: int) -> Capacity:
    system = {"role": "system", "content": system_prompt(seed)}
    shared = common_prefix(_prompt([system, {"role": "user", "content": "a"}]),
                           _prompt([system, {"role": "user", "content": "b"}]))  # fmt: skip
    histories: dict[int, list[dict[str, str]]] = {}
    cached: dict[int, int] = {}  # session: tokens its last turn left in the slot
    seen: dict[str, list[tuple[int, int, int]]] = defaultdict(list)  # model: (output, uncached, cold)
    for r in itertools.islice(arrivals(seed), CAPACITY_SAMPLE):
        if r.session is None:
            n = len(_prompt([{"role": "user", "content": r.text}]))
            seen[r.model].append((r.max_tokens, n, n))
            continue
        history = histories.setdefault(r.session, [system])
        history.append({"role": "user", "content": r.text})
        n = len(_prompt(history))
        seen[r.model].append((r.max_tokens, n - cached.get(r.session, shared), n - shared))
        cached[r.session] = n + r.max_tokens - 1  # the slot keeps all but the last generated token
        history.append({"role": "assistant", "content": "x" * r.max_tokens})  # one byte per token
    total = sum(len(v) for v in seen.values())
    share = {m: len(v) / total for m, v in seen.items()}
    output = {m: _mean(o for o, _, _ in v) for m, v in seen.items()}
    uncached = {m: _mean(u for _, u, _ in v) for m, v in seen.items()}
    cold = {m: _mean(c for _, _, c in v) for m, v in seen.items()}
    pool = {m: _pool_rate(m, output[m], uncached[m]) for m in seen}
    pool_cold = {m: _pool_rate(m, output[m], cold[m]) for m in seen}
    return Capacity(
        share, output, uncached, cold, pool, pool_cold,
        fleet=min(pool[m] / share[m] for m in seen), fleet_cold=min(pool_cold[m] / share[m] for m in seen),
    )  # fmt: skip


def _pool_rate(model: str, output: float, uncached: float) -> float:
    members = [c for c in FLEET.values() if c.model == model]
    return sum(c.slots * 1000 / (output * c.decode_ms + uncached * c.prefill_ms) for c in members)


def _mean(values: Iterable[float]) -> float:
    items = list(values)
    return sum(items) / len(items)


# --- the fleet process ---------------------------------------------------------------


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


# --- one run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    request: Request
    status: int  # 0: no HTTP answer
    ttft: float | None = None  # to the first chunk with content
    e2e: float | None = None
    finished: float = 0.0  # seconds after the start
    reply: str = ""
    output_tokens: int = 0
    cache_n: int = 0
    prompt_n: int = 0
    endpoint: str = ""
    affinity: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.e2e is not None


def router_config(urls: list[str], balancer: str, affinity: bool) -> dict[str, Any]:
    endpoints = [{"name": name, "url": url, "type": "llamacpp", "check_interval": "1s"}
                 for name, url in zip(FLEET, urls, strict=True)]  # fmt: skip
    return {
        "server": {"shutdown_timeout": "1s"},
        "proxy": {"load_balancer": balancer, "affinity": {"enabled": affinity}},
        "discovery": {"slots_interval": "1s", "static": {"endpoints": endpoints}},
        "logging": {"level": "warning"},
    }


async def wait_ready(base: str, timeout: float = 30.0) -> None:
    """Every endpoint healthy, with its model discovered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            async with session.get(base + "/internal/status/endpoints") as r:
                endpoints = (await r.json())["endpoints"]
            if len(endpoints) == len(FLEET) and all(e["status"] == "healthy" and e["models"] for e in endpoints):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("the router never found every endpoint healthy")


async def ask(session: aiohttp.ClientSession, url: str, request: Request, messages: list[dict[str, str]],
              start: float) -> Result:  # fmt: skip
    body = {"model": request.model, "messages": messages, "max_tokens": request.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    loop = asyncio.get_running_loop()
    sent = loop.time()
    ttft: float | None = None
    parts: list[str] = []
    last: dict[str, Any] = {}
    try:
        async with session.post(url, json=body) as response:
            head = {"endpoint": response.headers.get("X-Olla-Endpoint", ""),
                    "affinity": response.headers.get("X-Olla-Affinity", "")}  # fmt: skip
            if response.status != 200:
                text = await response.text()
                return Result(request, response.status, finished=loop.time() - start, error=text[:200], **head)
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return Result(request, 200, finished=loop.time() - start, error=str(event["error"])[:200], **head)
                for choice in event.get("choices") or ():
                    if content := (choice.get("delta") or {}).get("content"):
                        ttft = ttft if ttft is not None else loop.time() - sent
                        parts.append(content)
                last.update((k, event[k]) for k in ("timings", "usage") if k in event)
    except (aiohttp.ClientError, ValueError) as exc:
        return Result(request, 0, finished=loop.time() - start, error=f"{type(exc).__name__}: {exc}"[:200])
    now = loop.time()
    timings = last.get("timings", {})
    return Result(
        request, 200, ttft, now - sent, now - start, "".join(parts), last.get("usage", {}).get("completion_tokens", 0),
        timings.get("cache_n", 0), timings.get("prompt_n", 0), error="" if timings else "no timings", **head,
    )  # fmt: skip


async def replay(base: str, system: str, requests: list[Request], limit: float) -> list[Result]:
    """Send the trace: one-shots at their time, a conversation's turn at its time or once the previous one ended."""
    results: list[Result] = []
    sessions: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        if r.session is not None:
            sessions[r.session].append(r)
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        url, start = base + PATH, loop.time() + 0.1

        async def due(r: Request) -> None:
            await asyncio.sleep(max(0.0, start + r.at - loop.time()))

        async def one_shot(r: Request) -> None:
            await due(r)
            results.append(await ask(session, url, r, [{"role": "user", "content": r.text}], start))

        async def conversation(turns: list[Request]) -> None:
            history = [{"role": "system", "content": system}]
            for r in turns:
                await due(r)
                history.append({"role": "user", "content": r.text})
                result = await ask(session, url, r, history, start)
                results.append(result)
                history.append({"role": "assistant", "content": result.reply})

        tasks = [asyncio.create_task(one_shot(r)) for r in requests if r.session is None]
        tasks += [asyncio.create_task(conversation(turns)) for turns in sessions.values()]
        _, pending = await asyncio.wait(tasks, timeout=start + limit - loop.time())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results


@dataclass(frozen=True)
class Run:
    setup: str
    level: float
    requests: list[Request]
    results: list[Result]
    waits: dict[str, Any]
    limit: float  # seconds after the start at which unfinished requests were cut


def run_once(setup: str, level: float, system: str, requests: list[Request], limit: float) -> Run:
    balancer, affinity = SETUPS[setup]
    with fleet_process(limit + 60) as (urls, stop_fleet):
        with router(router_config(urls, balancer, affinity)) as base:
            asyncio.run(wait_ready(base))
            results = asyncio.run(replay(base, system, requests, limit))
        waits = stop_fleet()
    return Run(setup, level, requests, results, waits, limit)


# --- the report ------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; requests cut at the time limit count as infinitely slow."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)] if ordered else math.nan


@dataclass(frozen=True)
class Row:
    run: Run

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.run.results if r.ok]

    @property
    def unfinished(self) -> int:
        return len(self.run.requests) - len(self.run.results)

    def latency(self, field: str, q: float) -> float:
        values = [getattr(r, field) for r in self.ok] + [math.inf] * self.unfinished
        return percentile(values, q)

    @property
    def tokens_per_second(self) -> float:
        wall = max((r.finished for r in self.run.results), default=0.0)
        return sum(r.output_tokens for r in self.ok) / wall if wall else 0.0

    def reprocessed(self, chat_only: bool = False) -> int:
        return sum(r.prompt_n for r in self.ok if not chat_only or r.request.session is not None)

    @property
    def hit_share(self) -> float:
        cached = sum(r.cache_n for r in self.ok)
        return cached / (cached + self.reprocessed()) if self.ok else math.nan

    @property
    def cache_kept(self) -> str:
        """Follow-up chat turns that found their conversation still cached where they ran, of all follow-ups."""
        sessions: dict[int, list[Result]] = defaultdict(list)
        for r in sorted(self.ok, key=lambda r: r.request.id):
            if r.request.session is not None:
                sessions[r.request.session].append(r)
        pairs = [pair for turns in sessions.values() for pair in itertools.pairwise(turns)]
        kept = sum(1 for a, b in pairs if b.cache_n >= a.cache_n + a.prompt_n + a.output_tokens - 1)
        return f"{kept} of {len(pairs)}"

    @property
    def rejected(self) -> int:
        return sum(1 for r in self.run.results if r.status == 503)

    @property
    def errors(self) -> int:
        return sum(1 for r in self.run.results if not r.ok and r.status != 503)


def _s(seconds: float) -> str:
    return "cut" if math.isinf(seconds) else f"{seconds:.2f}"


def table(rows: list[Row]) -> list[str]:
    lines = [
        "| load | balancer | requests | TTFT p50 s | TTFT p95 s | TTFT p99 s | e2e p50 s | e2e p99 s | output tok/s "
        "| prompt tokens re-processed | of them in chat turns | cache hit share "
        "| waited on an endpoint with a free slot elsewhere (all that waited on an endpoint) "
        "| 503 | other errors | unfinished |",
        "| --- | --- " + "| ---: " * 14 + "|",
    ]
    for row in rows:
        run = row.run
        lines.append(
            f"| {run.level:.0%} | {run.setup} | {len(run.requests)} | {_s(row.latency('ttft', 50))} "
            f"| {_s(row.latency('ttft', 95))} | {_s(row.latency('ttft', 99))} | {_s(row.latency('e2e', 50))} "
            f"| {_s(row.latency('e2e', 99))} | {row.tokens_per_second:.0f} | {row.reprocessed():,} "
            f"| {row.reprocessed(chat_only=True):,} | {row.hit_share:.0%} | {run.waits.get('avoidable', '?')} "
            f"({run.waits.get('queued', '?')}) | {row.rejected} | {row.errors} | {row.unfinished} |"
        )
    return lines


def ratios(rows: list[Row]) -> list[str]:
    lines = [
        f"| load | balancer | TTFT p99 / {BASELINE} | chat prompt tokens re-processed / {BASELINE} "
        "| follow-up chat turns that found their conversation cached | affinity hit / moved / miss "
        "| requests per endpoint (" + ", ".join(FLEET) + ") |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    base = {row.run.level: row for row in rows if row.run.setup == BASELINE}
    for row in rows:
        b = base[row.run.level]
        served = Counter(r.endpoint for r in row.run.results)
        seen = Counter(r.affinity for r in row.run.results)
        affinity = f"{seen['hit']} / {seen['moved']} / {seen['miss']}" if SETUPS[row.run.setup][1] else "off"
        lines.append(
            f"| {row.run.level:.0%} | {row.run.setup} | {_ratio(row.latency('ttft', 99), b.latency('ttft', 99))} "
            f"| {_ratio(row.reprocessed(True), b.reprocessed(True))} | {row.cache_kept} | {affinity} "
            f"| {' / '.join(str(served[n]) for n in FLEET)} |"
        )
    return lines


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b and math.isfinite(a) and math.isfinite(b) else "n/a"


def targets(rows: list[Row]) -> list[str]:
    by = {(row.run.setup, row.run.level): row for row in rows}
    top = max(LEVELS)
    best, base = by[("slot-aware+affinity", top)], by[(BASELINE, top)]
    p99, p99_base = best.latency("ttft", 99), base.latency("ttft", 99)
    lines = [
        f"- At {top:.0%} load, slot-aware+affinity TTFT p99 at most half that of {BASELINE}: "
        f"{_s(p99)} s vs {_s(p99_base)} s (ratio {_ratio(p99, p99_base)}): **{_verdict(p99 <= p99_base / 2)}**."
    ]
    for level in LEVELS:
        mine, theirs = by[("slot-aware+affinity", level)].reprocessed(True), by[(BASELINE, level)].reprocessed(True)
        lines.append(
            f"- At {level:.0%} load, prompt tokens re-processed in chat turns at most half those of {BASELINE}: "
            f"{mine:,} vs {theirs:,} (ratio {_ratio(mine, theirs)}): **{_verdict(mine <= theirs / 2)}**."
        )
    for setup in ("slot-aware", "slot-aware+affinity"):
        counts = [by[(setup, level)].run.waits.get("avoidable", -1) for level in LEVELS]
        lines.append(
            f"- {setup}: no request waited on an endpoint while another had a free slot: "
            f"{' and '.join(map(str, counts))} at {' and '.join(f'{lv:.0%}' for lv in LEVELS)} load: "
            f"**{_verdict(all(c == 0 for c in counts))}**."
        )
    return lines


def _verdict(met: bool) -> str:
    return "met" if met else "not met"


def chart(rows: list[Row], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("the chart needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    panels = [
        ("TTFT p99 (s, log scale)", lambda row: row.latency("ttft", 99), True),
        ("prompt tokens re-processed, chat turns", lambda row: row.reprocessed(True), True),
        ("waited on an endpoint with a free slot elsewhere", lambda row: row.run.waits.get("avoidable", 0), False),
    ]
    by = {(row.run.setup, row.run.level): row for row in rows}
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.5))
    width = 0.8 / len(LEVELS)
    for ax, (title, value, completed_only) in zip(axes, panels, strict=True):
        for i, level in enumerate(LEVELS):
            runs = [by[(setup, level)] for setup in SETUPS]
            heights = [value(row) if math.isfinite(value(row)) else row.run.limit for row in runs]
            bars = ax.bar([x + i * width for x in range(len(SETUPS))], heights, width, label=f"{level:.0%} load")
            cut = [f"{row.unfinished} cut" if row.unfinished and completed_only else "" for row in runs]
            ax.bar_label(bars, cut, fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([x + width * (len(LEVELS) - 1) / 2 for x in range(len(SETUPS))], list(SETUPS), fontsize=8)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    fig.suptitle("olla balancers on an emulated fleet, same trace each (bench/routing.py); "
                 "'N cut': that many requests unfinished at the time limit")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace, cap: Capacity, rows: list[Row], wall: float, output: Path) -> str:
    fleet = [f"| {name} | {c.model} | {c.slots} | {c.prefill_ms:g} | {c.decode_ms:g} |" for name, c in FLEET.items()]
    sim = next(iter(FLEET.values()))
    pools = [
        f"| {m} | {cap.share[m]:.0%} | {cap.output[m]:.1f} | {cap.uncached[m]:.0f} | {cap.pool[m]:.2f} "
        f"| {cap.cold[m]:.0f} | {cap.pool_cold[m]:.2f} | "
        + " / ".join(f"{lv * cap.fleet * cap.share[m] / cap.pool[m]:.0%}" for lv in LEVELS) + " |"
        for m in sorted(cap.share)
    ]
    runs = {level: len(next(r.run.requests for r in rows if r.run.level == level)) for level in LEVELS}
    argv = " ".join(sys.argv[1:])
    return "\n".join([
        "# Balancers on an emulated fleet",
        "",
        f"Command: `{f'.venv/bin/python -m bench.routing {argv}'.strip()}`",
        f"(seed {args.seed}, {args.duration:g} s of arrivals per run, each run cut {_limit(args):g} s after its start;"
        f" whole benchmark: {wall / 60:.1f} min of wall time on {_cores()} cores).",
        "",
        "Each run starts a fresh emulated fleet (cold KV caches) and a fresh router (`python -m olla serve`), "
        "then replays the same trace. Router config: `check_interval: 1s`, `discovery.slots_interval: 1s`, "
        "equal priorities, queue defaults (256 waiting, 30 s).",
        "",
        "## Fleet",
        "",
        "| endpoint | model | slots | prefill ms/token | decode ms/token |",
        "| --- | --- | ---: | ---: | ---: |",
        *fleet,
        "",
        f"Every endpoint: n_ctx {N_CTX} per slot and the emulator's other defaults, among them its RAM prompt cache "
        f"(`cache_ram_tokens` {sim.cache_ram_tokens:,}, restoring at {sim.cache_load_fraction:g} × prefill cost).",
        "",
        "## Workload",
        "",
        f"Poisson arrivals. {CHAT_SHARE:.0%} are chat turns on `{CHAT}`: {LANES} conversations in progress at once, "
        f"each arrival the next turn of a random one; a conversation lasts {TURNS[0]}-{TURNS[1]} turns, then a new one "
        f"starts. Every conversation opens with the same {SYSTEM_CHARS}-character system prompt; each turn adds a "
        f"{USER_CHARS[0]}-{USER_CHARS[1]}-character user message, and the reply is appended before the next turn, "
        "which is sent at its time or when the previous turn ends, whichever is later. The other "
        f"{1 - CHAT_SHARE:.0%} are one-shot prompts of {ONE_SHOT_CHARS[0]}-{ONE_SHOT_CHARS[1]} random characters, "
        f"{ONE_SHOT_ON_CODE:.0%} of them on `{CODE}`, the rest on `{CHAT}`. Every request streams "
        f"(`stream_options.include_usage`) with max_tokens {MAX_TOKENS[0]}-{MAX_TOKENS[1]}; the emulator's tokenizer "
        "is one token per byte and it always generates max_tokens. Requests per run: "
        + ", ".join(f"{n} at {lv:.0%}" for lv, n in runs.items()) + ".",
        "",
        "## Capacity",
        "",
        "Per model: sum over its endpoints of slots / (mean output tokens × decode ms + mean uncached prompt tokens "
        "× prefill ms), means over the first "
        f"{CAPACITY_SAMPLE} arrivals. **Assumption:** a chat turn processes only what its conversation's previous "
        "turn did not leave in the KV cache (the first turn: everything after the shared system prompt); one-shots "
        "are processed in full. The fleet's capacity is the arrival rate at which the first pool is full: "
        f"**{cap.fleet:.2f} requests/s**, so the runs send "
        + " and ".join(f"{lv * cap.fleet:.2f}/s ({lv:.0%})" for lv in LEVELS)
        + f". Were only the system prompt cached, capacity would be {cap.fleet_cold:.2f}/s, and these rates "
        + " and ".join(f"{lv * cap.fleet / cap.fleet_cold:.0%}" for lv in LEVELS) + " of it.",
        "",
        "| model | share of arrivals | mean output tokens | mean uncached prompt tokens | capacity req/s "
        "| uncached, system prompt only | capacity req/s then "
        "| pool load at " + " / ".join(f"{lv:.0%}" for lv in LEVELS) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        *pools,
        "",
        "## Results",
        "",
        "TTFT: from sending to the first streamed chunk with content. Latency percentiles are over successful "
        "requests (nearest rank; a request still unfinished at the cut counts as infinitely slow, shown `cut`). "
        "Output tok/s: output tokens / time from the start to the last response. Re-processed: sum of "
        "`timings.prompt_n`; cache hit share: sum `cache_n` / sum (`cache_n` + `prompt_n`); both, like output "
        "tokens, count completed requests only, so a run with unfinished requests shows less. Waits are counted "
        f"in the fleet process, sampling every {SAMPLE_SECONDS * 1000:g} ms (a request that waits less than a "
        "sample apart can be missed): a rise in an endpoint's waiting count while another endpoint of the same "
        "model has a free slot. One run per balancer and load: a p99 rests on the few slowest requests of a run.",
        "",
        *table(rows),
        "",
        f"Ratios against {BASELINE} at the same load, and where requests went:",
        "",
        *ratios(rows),
        "",
        "Sampling period achieved in the fleet process (ms): "
        + ", ".join(f"{r.run.setup} {r.run.level:.0%} {r.run.waits.get('period_ms', math.nan):.1f}" for r in rows)
        + ".",
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
        "Chart: [routing.png](routing.png).",
        "",
    ])  # fmt: skip


def _limit(args: argparse.Namespace) -> float:
    return max(20.0, 1.5 * args.duration)


def _cores() -> int:
    return os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run (default 40)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (8 s per run), written to a temp dir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--serve-fleet", type=float, metavar="LIFETIME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fleet is not None:
        asyncio.run(serve_fleet(args.serve_fleet))
        return
    if args.quick:
        args.duration = min(args.duration, 8.0)
    output = args.output or (Path(tempfile.mkdtemp(prefix="olla-routing-")) if args.quick else RESULTS)
    began = time.monotonic()
    cap = capacity(args.seed)
    system = system_prompt(args.seed)
    rows: list[Row] = []
    for level in LEVELS:
        requests = trace(args.seed, level * cap.fleet, args.duration)
        for setup in SETUPS:
            run = run_once(setup, level, system, requests, _limit(args))
            rows.append(Row(run))
            print(table([rows[-1]])[-1], flush=True)
    output.mkdir(parents=True, exist_ok=True)
    chart(rows, output / "routing.png")
    (output / "routing.md").write_text(report(args, cap, rows, time.monotonic() - began, output))
    print(f"wrote {output / 'routing.md'} and routing.png in {(time.monotonic() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
