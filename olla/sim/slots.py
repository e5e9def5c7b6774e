"""llama-server's slots: N of them, each keeping the tokens it last processed.

A request takes the idle slot whose cache shares the longest prefix with its
prompt (when that prefix is at least `similarity` of the prompt), otherwise the
least recently used idle slot. When none is idle it waits in an unbounded FIFO;
llama-server defers such tasks and never rejects them.

With a RAM prompt cache, a slot taken as the least recently used, or one that
would keep less than half of its tokens, first saves them there and then gets
the cached prompt that best matches the new one; a slot pinned with `id_slot`
does neither. Whenever a slot is taken, every idle slot is saved too
(`--cache-idle-slots`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from olla.sim.promptcache import PromptCache, common_prefix

How = Literal["pinned", "similar", "lru"]


@dataclass
class Slot:
    id: int
    cache: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0
    id_task: int = -1
    params: dict[str, Any] | None = None
    n_prompt_processed: int = 0
    n_prompt_cached: int = 0
    n_decoded: int = 0
    n_remain: int = -1
    has_new_line: bool = False
    n_restored: int = 0  # tokens just restored from the RAM prompt cache

    def finish(self) -> None:
        self.busy = False
        self.n_prompt_processed = self.n_prompt_cached = self.n_decoded = self.n_restored = 0
        self.n_remain = -1
        self.has_new_line = False


def choose(slots: Sequence[Slot], prompt: list[int], similarity: float, pinned: int = -1) -> Slot | None:
    """The idle slot a prompt should take, or None when it has to wait."""
    return _choose(slots, prompt, similarity, pinned)[0]


def _choose(slots: Sequence[Slot], prompt: list[int], similarity: float, pinned: int) -> tuple[Slot | None, How]:
    if pinned >= 0:
        slot = slots[pinned % len(slots)]
        return (None if slot.busy else slot), "pinned"
    idle = [s for s in slots if not s.busy]
    if not idle:
        return None, "lru"
    if prompt and similarity > 0:
        shared = [common_prefix(s.cache, prompt) for s in idle]
        best = max(range(len(idle)), key=shared.__getitem__)
        if shared[best] / len(prompt) >= similarity:
            return idle[best], "similar"
    return min(idle, key=lambda s: s.last_used), "lru"


@dataclass(eq=False)
class _Waiter:
    prompt: list[int]
    pinned: int
    future: asyncio.Future[Slot]


class SlotPool:
    def __init__(self, n_slots: int, similarity: float = 0.1, prompt_cache: PromptCache | None = None) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.similarity = similarity
        self.prompt_cache = prompt_cache
        self._queue: deque[_Waiter] = deque()
        self._tick = 0

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def acquire(self, prompt: list[int], pinned: int = -1) -> Slot:
        waiter = _Waiter(prompt, pinned, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._dispatch()
        try:
            return await waiter.future
        except asyncio.CancelledError:
            if waiter.future.done() and not waiter.future.cancelled():
                self.release(waiter.future.result())
            elif waiter in self._queue:
                self._queue.remove(waiter)
            raise

    def release(self, slot: Slot) -> None:
        slot.finish()
        self._dispatch()

    def forget(self) -> None:
        """Drop every cached prompt, as a restarted process would."""
        for slot in self.slots:
            slot.cache = []
            slot.id_task = -1
            slot.params = None
        if self.prompt_cache is not None:
            self.prompt_cache.clear()

    def _take(self, slot: Slot, how: How, prompt: list[int]) -> Slot:
        cache = self.prompt_cache
        if cache is not None and _swaps_out(slot, how, prompt):
            cache.save(slot.cache)
            restored = cache.load(slot.cache, prompt)
            if restored is not None:
                slot.cache, slot.n_restored = restored, len(restored)
        self._tick += 1
        slot.busy = True
        slot.last_used = self._tick
        if cache is not None:
            for idle in self.slots:
                if not idle.busy:
                    cache.save(idle.cache)
        return slot

    def _dispatch(self) -> None:
        for waiter in list(self._queue):
            if waiter.future.done():
                self._queue.remove(waiter)
                continue
            slot, how = _choose(self.slots, waiter.prompt, self.similarity, waiter.pinned)
            if slot is None:
                if all(s.busy for s in self.slots):
                    return
                continue
            self._queue.remove(waiter)
            waiter.future.set_result(self._take(slot, how, waiter.prompt))


def _swaps_out(slot: Slot, how: How, prompt: list[int]) -> bool:
    """Whether llama-server would save the slot's prompt and look for a better one (C:1680-1793)."""
    if how == "pinned":
        return False
    return how == "lru" or common_prefix(slot.cache, prompt) < len(slot.cache) / 2
