"""The fleet, the balancers compared, and the workload: a seeded arrival trace and the capacity it implies."""

from __future__ import annotations

import itertools
import random
import string
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace

from olla.sim import SimConfig
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
