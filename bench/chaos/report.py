"""The Markdown report of one chaos run."""

from __future__ import annotations

import os
from collections import Counter

from bench.chaos import adversary, clients
from bench.chaos.clients import Result
from bench.chaos.harness import (
    CHECKS,
    CLIENT_TIMEOUT,
    FLEET,
    PROXY,
    QUIET_TIMEOUT,
    RESPONSE_TIMEOUT,
    SETTLE,
    WATCH_SECONDS,
    Run,
)  # fmt: skip
from bench.chaos.timeline import KINDS
from bench.chaos.verdict import UNEXPLAINED, VERDICTS

INCIDENT_GAP = 2.0  # seconds between two unexplained failures of one incident
VIEW_BEFORE = 2.0  # seconds of the router's view shown before an incident's first failure


def report(run: Run, command: str) -> str:
    return "\n".join([
        "# Chaos and soak: the router under an adversary",
        "",
        f"Command: `{command}`",
        "",
        _summary(run),
        "",
        f"**Result: {'pass' if run.passed else 'FAIL'}.**",
        "",
        "| criterion | measured | |",
        "| --- | --- | --- |",
        *(f"| {c.name} | {c.measured} | {'met' if c.met else '**not met**'} |" for c in run.criteria),
        "",
        "## Requests",
        "",
        *_requests(run),
        "",
        CLASSIFIED,
        "",
        "## The adversary",
        "",
        *_adversary(run),
        "",
        "## After the run",
        "",
        *_after(run),
        "",
        *_failures(run),
        "## Setup",
        "",
        _setup(),
        "",
    ])  # fmt: skip


def _summary(run: Run) -> str:
    o, cpu = run.options, run.cpu
    return (
        f"Seed {o.seed}, {o.duration:g} s of chaos, {o.clients} clients, an adversary action every {o.pace:g} s on "
        f"average; {run.wall / 60:.1f} min of wall time in all. Machine: {os.cpu_count()} cores shared with other "
        f"work; 1-minute load average {run.load[0]:.2f} at the start and {run.load[1]:.2f} at the end. CPU time "
        f"used during the run: router {cpu['router']:.0f} s ({cpu['router'] / o.duration:.0%} of a core), "
        f"harness (fleet, clients and adversary in one process) {cpu['harness']:.0f} s "
        f"({cpu['harness'] / o.duration:.0%} of a core)."
    )


def _requests(run: Run) -> list[str]:
    kinds = list(clients.MIX)
    by = Counter((r.kind, v) for r, v in zip(run.results, run.verdicts, strict=True))
    sent = Counter(r.kind for r in run.results)
    lines = [
        "| | " + " | ".join(kinds) + " | all |",
        "| --- " + "| ---: " * (len(kinds) + 1) + "|",
        "| sent | " + " | ".join(str(sent[k]) for k in kinds) + f" | {len(run.results)} |",
    ]
    for verdict in VERDICTS:
        lines.append(
            f"| {verdict} | " + " | ".join(str(by[(k, verdict)]) for k in kinds) + f" | {run.counts[verdict]} |"
        )
    return lines


CLASSIFIED = (
    "How a request is classified: no response body and status 0 (no answer) or 5xx, other than 503 "
    "`slots_exhausted`, is a failure before the first byte. It counts as *every candidate down* when, at some "
    "time while it ran, no endpoint of its model was healthy. An endpoint counts as healthy from "
    f"{SETTLE:g} s after the adversary's last fault on it ended (a killed endpoint's fault ends when it has "
    "reloaded): that is the grace for the router to bring it back (offline backoff, then two good probes in a row). "
    f"After a hang the grace is {RESPONSE_TIMEOUT:g} s longer: a request the hang held gets no headers until "
    "`proxy.response_timeout`, and that late timeout takes the endpoint out of rotation unless it has answered a "
    "request well since (docs/routing.md, Breaker). A failure counts as "
    "*504 after an endpoint was hung* when it is a 504 and an endpoint of its model (one the error names, when "
    "it names any: a hang that ends in a kill leaves the next attempt only what is left of the deadline) was hung "
    "while it ran: on routes that take a slot the router waits for headers up to "
    f"`proxy.response_timeout` ({PROXY['response_timeout']} here) by design, because llama-server sends none while "
    "a request waits for a slot or a non-streamed generation runs (docs/routing.md). Any other such failure is a "
    "failure *while a candidate was healthy*. A 200 whose body ended early (an SSE `error` event, no `[DONE]`, a "
    "dropped connection) is *cut mid-stream*; it is on an endpoint the adversary broke when the endpoint in "
    "`X-Olla-Endpoint` was killed, hung or cut by the adversary while the request ran."
)


def _adversary(run: Run) -> list[str]:
    counts = run.timeline.count()
    held = dict.fromkeys(KINDS, 0.0)
    for a in run.timeline.actions:
        held[a.kind] += a.end - a.start
    spans = []
    for model in sorted(set(run.timeline.models.values())):
        down = run.timeline.down(model)
        spans.append(f"{model} {sum(e - s for s, e in down):.0f} s in {len(down)} spans")
    return [
        "| action | what it does | times | endpoint-seconds |",
        "| --- | --- | ---: | ---: |",
        *(f"| {kind} | {_doc(kind)} | {counts[kind]} | {held[kind]:.0f} |" for kind in KINDS),
        "",
        (
            "The adversary acts on an endpoint only while it shows no fault and another endpoint of the same model "
            f"is healthy; {run.skipped} draws found no such endpoint and were skipped. A blackout kills every "
            "endpoint of one model. Time with every candidate of a model down (grace included): "
            + ", ".join(spans) + f", of {run.options.duration:g} s."
        ),
    ]  # fmt: skip


def _doc(kind: str) -> str:
    """The kind's line in the adversary's docstring."""
    for line in (adversary.__doc__ or "").splitlines():
        if line.strip().startswith(kind + " "):
            return line.strip()[len(kind) :].strip()
    return ""


def _after(run: Run) -> list[str]:
    memory, log = run.memory, run.router_log
    return [
        (
            f"The harness waited {run.leftover.waited:.1f} s for quiet (at most {QUIET_TIMEOUT:g} s) before reading "
            "busy slots: the router's `/internal/status/endpoints` (`in_flight`, `busy_slots`) and "
            "`/internal/status/models` (queue length), each emulated endpoint's `/slots` (`is_processing`) and wait "
            "queue. The router's view of the endpoints then: "
            + ", ".join(f"{name} {status}" for name, status in run.health.items()) + "."
        ),
        "",
        (
            f"Router memory (VmRSS from /proc, sampled every second): {memory.start / 1024:.1f} MiB when the chaos "
            f"began, {memory.warm / 1024:.1f} MiB after warm-up ({run.options.warmup:.0%} of the run), peak "
            f"{memory.peak / 1024:.1f} MiB, {memory.end / 1024:.1f} MiB at the end."
        ),
        "",
        (
            f"Sampled every {WATCH_SECONDS:g} s: requests waiting inside an emulated endpoint {_most_waiting(run)} at "
            f"most (a slot-aware router keeps none there while a slot is free elsewhere); the harness's event loop "
            f"woke up at most {max(run.watch.lags, default=0) * 1000:.0f} ms late; the router changed its view of an "
            f"endpoint {len(run.watch.changes)} times."
        ),
        "",
        "Router log (level warning and up): "
        + (", ".join(f"{n} {level}" for level, n in sorted(log["levels"].items())) or "empty") + ".",
        *(f"- `{p}`" for p in log["problems"]),
    ]  # fmt: skip


def _most_waiting(run: Run) -> int:
    at: Counter[float] = Counter()
    for t, _, waiting in run.watch.waiting:
        at[t] += waiting
    return max(at.values(), default=0)


def _views(run: Run, model: str, start: float, end: float) -> str:
    """The router's view of a model's endpoints from `start` to `end` (seconds since the start), from the polled
    changes: each endpoint's state as the span began, since when, then every change in the span."""
    views: dict[str, list[str]] = {}
    for t, name, status, detail in run.watch.changes:
        if t > end or run.timeline.models.get(name) != model:
            continue
        seen = f"{status} ({detail})" if detail else status
        if t <= start:
            views[name] = [f"{seen} since {t:.2f}"]
        else:
            views.setdefault(name, []).append(f"{t:.2f} {seen}")
    return "; ".join(f"{name} {', then '.join(seen)}" for name, seen in sorted(views.items()))


def _failures(run: Run) -> list[str]:
    """Unexplained failures in incidents (none more than INCIDENT_GAP apart), each with an example."""
    bad = sorted((r for r, v in zip(run.results, run.verdicts, strict=True) if v in UNEXPLAINED), key=lambda r: r.ended)
    if not bad:
        return []
    incidents: list[list[Result]] = [[bad[0]]]
    for r in bad[1:]:
        if r.ended - incidents[-1][-1].ended > INCIDENT_GAP:
            incidents.append([])
        incidents[-1].append(r)
    t0 = run.watch.started
    lines = [
        f"Unexplained failures: {len(bad)}, in {len(incidents)} incidents (times in seconds since the start):",
        "",
        "| from | to | requests | status and code | an example | the router's view, from 2 s before its first failure to its end |",
        "| ---: | ---: | ---: | --- | --- | --- |",
    ]
    for group in incidents:
        first = group[0]
        codes = Counter(f"{r.status} {r.code}" for r in group)
        example = f"{first.kind} {first.model} at {first.endpoint or '-'}: {first.message}".replace("|", "\\|")
        lines.append(
            f"| {group[0].sent - t0:.2f} | {group[-1].ended - t0:.2f} | {len(group)} "
            f"| {', '.join(f'{n}x {c}' for c, n in codes.items())} | {example} "
            f"| {_views(run, first.model, group[0].ended - t0 - VIEW_BEFORE, group[-1].ended - t0)} |"
        )
    lines += ["", "What the adversary did (seconds since the start):", ""]
    lines += [f"- {a.start - t0:.2f}-{a.end - t0:.2f} {a.kind} {a.endpoint} {a.detail}".rstrip()
              for a in sorted(run.timeline.actions, key=lambda a: a.start)]  # fmt: skip
    return [*lines, ""]


def _setup() -> str:
    models = Counter(c.model for c in FLEET.values())
    sim = next(iter(FLEET.values()))
    return (
        f"Fleet: {len(FLEET)} emulated llama-servers (`olla.sim`) in the harness process, "
        + ", ".join(f"{n} serving `{m}`" for m, n in models.items())
        + f"; each {sim.slots} slots, {sim.prefill_ms:g} ms per prompt token, {sim.decode_ms:g} ms per generated "
        f"token, {sim.load_seconds:g} s of loading after a restart. Router: `python -m olla serve` in its own "
        f"process, default balancer (slot-aware), `proxy` {PROXY}, every endpoint {CHECKS}, "
        "`discovery.slots_interval: 1s`.\n\n"
        f"Clients: each holds a conversation of {clients.TURNS[0]}-{clients.TURNS[1]} turns with one model and sends "
        + ", ".join(f"{share:.0%} {kind}" for kind, share in clients.MIX.items())
        + " (stream: a streamed chat turn; plain: a non-streamed one; tokenize: `/tokenize`), max_tokens "
        f"{clients.MAX_TOKENS[0]}-{clients.MAX_TOKENS[1]}, pausing up to {clients.THINK * 1000:g} ms between "
        f"requests, and gives up on a request {CLIENT_TIMEOUT:g} s after sending it. The seed fixes every "
        "client's and the adversary's choices; when they happen depends on the machine, so two runs match in kind, "
        "not request for request."
    )
