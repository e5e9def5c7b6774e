"""The Markdown report and the chart."""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench.routing.replay import Result, Run, cut_after
from bench.routing.workload import (
    BASELINE,
    CAPACITY_SAMPLE,
    CHAT,
    CHAT_SHARE,
    CODE,
    FLEET,
    LANES,
    LEVELS,
    MAX_TOKENS,
    N_CTX,
    ONE_SHOT_CHARS,
    ONE_SHOT_ON_CODE,
    SAMPLE_SECONDS,
    SETUPS,
    SYSTEM_CHARS,
    TURNS,
    USER_CHARS,
    Capacity,
)  # fmt: skip


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

    def follow_ups(self, affinity: str | None = None) -> str:
        """Follow-up chat turns that found their conversation still cached where they ran, of all follow-ups
        (of those with this X-Olla-Affinity)."""
        sessions: dict[int, list[Result]] = defaultdict(list)
        for r in sorted(self.ok, key=lambda r: r.request.id):
            if r.request.session is not None:
                sessions[r.request.session].append(r)
        pairs = [(a, b) for turns in sessions.values() for a, b in itertools.pairwise(turns)
                 if affinity is None or b.affinity == affinity]  # fmt: skip
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
        ("| load | balancer | requests | TTFT p50 s | TTFT p95 s | TTFT p99 s | e2e p50 s | e2e p99 s | output tok/s "
        "| prompt tokens re-processed | of them in chat turns | cache hit share "
        "| waited on an endpoint with a free slot elsewhere (all that waited on an endpoint) "
        "| 503 | other errors | unfinished |"),
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
        "| affinity hits that found their conversation cached | requests per endpoint (" + ", ".join(FLEET) + ") |",
        "| --- | --- | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    base = {row.run.level: row for row in rows if row.run.setup == BASELINE}
    for row in rows:
        b = base[row.run.level]
        served = Counter(r.endpoint for r in row.run.results)
        seen = Counter(r.affinity for r in row.run.results)
        on = SETUPS[row.run.setup][1]
        affinity = f"{seen['hit']} / {seen['moved']} / {seen['miss']}" if on else "off"
        lines.append(
            f"| {row.run.level:.0%} | {row.run.setup} | {_ratio(row.latency('ttft', 99), b.latency('ttft', 99))} "
            f"| {_ratio(row.reprocessed(True), b.reprocessed(True))} | {row.follow_ups()} | {affinity} "
            f"| {row.follow_ups('hit') if on else 'off'} "
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
        (f"- At {top:.0%} load, slot-aware+affinity TTFT p99 at most half that of {BASELINE}: "
        f"{_s(p99)} s vs {_s(p99_base)} s (ratio {_ratio(p99, p99_base)}): **{_verdict(p99 <= p99_base / 2)}**.")
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
    fig.suptitle("olla balancers on an emulated fleet, same trace each (bench/routing); "
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
        (f"(seed {args.seed}, {args.duration:g} s of arrivals per run, each run cut {cut_after(args.duration):g} s after its start;"
        f" whole benchmark: {wall / 60:.1f} min of wall time on {os.cpu_count() or 1} cores)."),
        "",
        ("Each run starts a fresh emulated fleet (cold KV caches) and a fresh router (`python -m olla serve`), "
        "then replays the same trace. Router config: `check_interval: 1s`, `discovery.slots_interval: 1s`, "
        "equal priorities, queue defaults (256 waiting, 30 s)."),
        "",
        "## Fleet",
        "",
        "| endpoint | model | slots | prefill ms/token | decode ms/token |",
        "| --- | --- | ---: | ---: | ---: |",
        *fleet,
        "",
        (f"Every endpoint: n_ctx {N_CTX} per slot and the emulator's other defaults, among them its RAM prompt cache "
        f"(`cache_ram_tokens` {sim.cache_ram_tokens:,}, restoring at {sim.cache_load_fraction:g} × prefill cost)."),
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
        ("TTFT: from sending to the first streamed chunk with content. Latency percentiles are over successful "
        "requests (nearest rank; a request still unfinished at the cut counts as infinitely slow, shown `cut`). "
        "Output tok/s: output tokens / time from the start to the last response. Re-processed: sum of "
        "`timings.prompt_n`; cache hit share: sum `cache_n` / sum (`cache_n` + `prompt_n`); both, like output "
        "tokens, count completed requests only, so a run with unfinished requests shows less. Waits are counted "
        f"in the fleet process, sampling every {SAMPLE_SECONDS * 1000:g} ms (a request that waits less than a "
        "sample apart can be missed): a rise in an endpoint's waiting count while another endpoint of the same "
        "model has a free slot. One run per balancer and load: a p99 rests on the few slowest requests of a run."),
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
        ("Why affinity hits often find the cache gone: olla picks the endpoint, llama-server picks the slot, the "
        "idle one sharing the longest prefix with the prompt. It saves a slot to its RAM prompt cache, and "
        "restores the best saved match, only when the new prompt keeps less than half of what the slot holds. "
        "Conversations here share a long system prompt and are shorter than twice it, so a turn that lands in "
        "another conversation's slot overwrites it unsaved and does not restore its own. Near capacity each freed "
        "slot is handed on at once, so the router keeps it for the conversation's next turn for "
        "`proxy.affinity.hold` (100 ms) from its second turn on. What is still lost: second turns (a first turn "
        "looks like a one-shot and gets no hold), turns sent after the hold, and idle slots another conversation "
        "lands in. The router never sets `id_slot`. Where the re-processed tokens come from, and the router changes "
        "tried: [routing-notes.md](routing-notes.md)."),
        "",
        "Chart: [routing.png](routing.png).",
        "",
    ])  # fmt: skip
