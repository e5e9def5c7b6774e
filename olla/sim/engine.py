"""The emulated model at work: a slot, a timed prefill, timed tokens, timings.

Costs follow llama-server's shape: `prefill_ms` for each prompt token the slot
has not cached (at least one token is always evaluated, so a repeated prompt
reports `cache_n = n - 1`), then `decode_ms` per generated token. Token times
are scheduled from the start of decoding, so sleeps do not add up drift.

What the slot has cached may just have come from the server's RAM prompt cache
(see `promptcache`); restoring it costs `cache_load_fraction` of `prefill_ms`
per restored token, before the prompt's own timer starts, as llama-server
restores a state before it starts processing the prompt.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from olla.sim import errors, tokens
from olla.sim.config import SimConfig
from olla.sim.metrics import Metrics
from olla.sim.promptcache import PromptCache, common_prefix
from olla.sim.slots import Slot, SlotPool

N_EMBD = 128
N_UBATCH = 512


@dataclass(frozen=True)
class Task:
    """What a completion request asks of the model. `n_predict` -1 means "until EOS"."""

    prompt: list[int]
    n_predict: int = -1
    params: dict[str, Any] = field(default_factory=dict)
    id_slot: int = -1
    seed: int | None = None
    cache_prompt: bool = True


class Generation:
    """One completion on one slot; the handler drives it token by token."""

    def __init__(self, engine: Engine, slot: Slot, task: Task) -> None:
        self.engine = engine
        self.slot = slot
        self.task = task
        self.prompt = task.prompt
        self.tokens: list[int] = []
        self.cache_n = 0
        self.prompt_ms = 0.0
        self.predicted_ms = 0.0
        self.truncated = False
        if task.n_predict < 0:
            self.limit, self.stop_type = engine.config.n_predict, "eos"
        else:
            # llama-server samples one token even for n_predict 0.
            self.limit, self.stop_type = max(task.n_predict, 1), "limit"
        room = engine.config.n_ctx - len(self.prompt)
        if self.limit > room:
            self.limit, self.stop_type, self.truncated = room, "limit", True
        seed = engine.config.seed if task.seed is None else task.seed
        self._source: Iterator[int] = iter(tokens.generated_tokens(seed, self.prompt))
        self._decode_start = 0.0

    @property
    def prompt_n(self) -> int:
        return len(self.prompt) - self.cache_n

    @property
    def done(self) -> bool:
        return len(self.tokens) >= self.limit

    @property
    def text(self) -> str:
        return tokens.detokenize(self.tokens)

    @property
    def tokens_cached(self) -> int:
        return len(self.prompt) + max(len(self.tokens) - 1, 0)

    async def prefill(self) -> None:
        engine, slot = self.engine, self.slot
        reusable = common_prefix(slot.cache, self.prompt) if self.task.cache_prompt else 0
        self.cache_n = min(reusable, len(self.prompt) - 1)
        slot.cache = self.prompt[: self.cache_n]
        slot.n_prompt_cached, slot.n_prompt_processed = self.cache_n, self.prompt_n
        slot.n_remain = self.limit
        restore_ms = engine.config.prefill_ms * engine.config.cache_load_fraction * slot.n_restored
        slot.n_restored = 0
        if restore_ms:
            await asyncio.sleep(restore_ms / 1000)
        start = engine.clock()
        await asyncio.sleep(engine.config.prefill_ms * self.prompt_n / 1000)
        self.prompt_ms = (engine.clock() - start) * 1000
        slot.cache = list(self.prompt)
        engine.metrics.on_prompt(self.prompt_n, self.cache_n, self.prompt_ms / 1000, engine.pool.busy)
        self._decode_start = engine.clock()

    async def next_token(self) -> int | None:
        """The next token once it is due, or None when generation has stopped."""
        if self.done:
            return None
        engine, slot = self.engine, self.slot
        due = self._decode_start + (len(self.tokens) + 1) * engine.config.decode_ms / 1000
        delay = due - engine.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.tokens:
            slot.cache.append(self.tokens[-1])
        token = next(self._source)
        self.tokens.append(token)
        self.predicted_ms = (engine.clock() - self._decode_start) * 1000
        slot.n_decoded, slot.n_remain = len(self.tokens), self.limit - len(self.tokens)
        slot.has_new_line = slot.has_new_line or token == ord("\n") + tokens.BYTE_BASE
        engine.metrics.on_decode(engine.pool.busy)
        return token

    async def stall(self, seconds: float) -> None:
        """Wait `seconds` and push the token schedule back as much, so later tokens keep their pace."""
        await asyncio.sleep(seconds)
        self._decode_start += seconds

    def timings(self) -> dict[str, Any]:
        return {
            "cache_n": self.cache_n,
            "prompt_n": self.prompt_n,
            "prompt_ms": round(self.prompt_ms, 3),
            "prompt_per_token_ms": _per_token(self.prompt_ms, self.prompt_n),
            "prompt_per_second": _per_second(self.prompt_ms, self.prompt_n),
            "predicted_n": len(self.tokens),
            "predicted_ms": round(self.predicted_ms, 3),
            "predicted_per_token_ms": _per_token(self.predicted_ms, len(self.tokens)),
            "predicted_per_second": _per_second(self.predicted_ms, len(self.tokens)),
        }


class Engine:
    def __init__(self, config: SimConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        prompt_cache = PromptCache(config.cache_ram_tokens) if config.cache_ram_tokens else None
        self.pool = SlotPool(config.slots, prompt_cache=prompt_cache)
        self.metrics = Metrics()
        self._task_ids = 0
        self.ids = random.Random()  # unseeded: ids must differ between servers, as real ones do

    def next_task_id(self) -> int:
        self._task_ids += 1
        return self._task_ids

    def completion_id(self) -> str:
        alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
        return "chatcmpl-" + "".join(self.ids.choice(alphabet) for _ in range(32))

    def restart(self) -> None:
        self.pool.forget()
        self.metrics = Metrics()

    @asynccontextmanager
    async def generation(self, task: Task) -> AsyncIterator[Generation]:
        """A slot for this task (waiting for one as long as it takes), released on exit."""
        slot = await self.pool.acquire(task.prompt, task.id_slot)
        gen: Generation | None = None
        try:
            slot.id_task, slot.params = self.next_task_id(), task.params
            if len(task.prompt) >= self.config.n_ctx:
                raise errors.context_exceeded(len(task.prompt), self.config.n_ctx)
            gen = Generation(self, slot, task)
            yield gen
        finally:
            if gen is not None and gen.tokens:
                self.metrics.on_predicted(len(gen.tokens), gen.predicted_ms / 1000, gen.tokens_cached + 1)
            self.pool.release(slot)

    async def embed(self, inputs: Sequence[list[int]]) -> list[list[float]]:
        """Mean-pooled, L2-normalised vectors; each input costs its prefill on one slot."""
        for item in inputs:
            if len(item) > N_UBATCH:
                raise errors.server_error(
                    f"input ({len(item)} tokens) is too large to process. "
                    f"increase the physical batch size (current batch size: {N_UBATCH})"
                )
        slot = await self.pool.acquire(inputs[0] if inputs else [])
        try:
            slot.id_task = self.next_task_id()
            slot.cache = []
            n = sum(len(item) for item in inputs)
            await asyncio.sleep(self.config.prefill_ms * n / 1000)
            return [embedding(item, self.config.seed) for item in inputs]
        finally:
            self.pool.release(slot)


def embedding(prompt: Sequence[int], seed: int) -> list[float]:
    total = [0.0] * N_EMBD
    for token in prompt:
        for i, value in enumerate(_token_vector(token, seed)):
            total[i] += value
    norm = math.sqrt(sum(v * v for v in total)) or 1.0
    return [v / norm for v in total]


_VECTORS: dict[tuple[int, int], list[float]] = {}


def _token_vector(token: int, seed: int) -> list[float]:
    key = (token, seed)
    if key not in _VECTORS:
        rng = random.Random(token * 1_000_003 + seed)
        _VECTORS[key] = [rng.gauss(0.0, 1.0) for _ in range(N_EMBD)]
    return _VECTORS[key]


def _per_token(ms: float, n: int) -> float:
    return ms / n if n and ms > 0 else 0.0


def _per_second(ms: float, n: int) -> float:
    return 1e3 / ms * n if n and ms > 0 else 0.0
