"""llama-server's slots: N of them, each keeping the tokens it last processed.

A request takes the idle slot whose cache shares the longest prefix with its
prompt (when that prefix is at least `similarity` of the prompt), otherwise the
least recently used idle slot. When none is idle it waits in an unbounded FIFO;
llama-server defers such tasks and never rejects them.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


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

    def finish(self) -> None:
        self.busy = False
        self.n_prompt_processed = self.n_prompt_cached = self.n_decoded = 0
        self.n_remain = -1
        self.has_new_line = False


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def choose(slots: Sequence[Slot], prompt: Sequence[int], similarity: float, pinned: int = -1) -> Slot | None:
    """The idle slot a prompt should take, or None when it has to wait."""
    if pinned >= 0:
        slot = slots[pinned % len(slots)]
        return None if slot.busy else slot
    idle = [s for s in slots if not s.busy]
    if not idle:
        return None
    if prompt and similarity > 0:
        best = max(idle, key=lambda s: common_prefix(s.cache, prompt))
        if common_prefix(best.cache, prompt) / len(prompt) >= similarity:
            return best
    return min(idle, key=lambda s: s.last_used)


@dataclass(eq=False)
class _Waiter:
    prompt: Sequence[int]
    pinned: int
    future: asyncio.Future[Slot]


class SlotPool:
    def __init__(self, n_slots: int, similarity: float = 0.1) -> None:
        self.slots = [Slot(i) for i in range(n_slots)]
        self.similarity = similarity
        self._queue: deque[_Waiter] = deque()
        self._tick = 0

    @property
    def busy(self) -> int:
        return sum(s.busy for s in self.slots)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    async def acquire(self, prompt: Sequence[int], pinned: int = -1) -> Slot:
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

    def _take(self, slot: Slot) -> Slot:
        self._tick += 1
        slot.busy = True
        slot.last_used = self._tick
        return slot

    def _dispatch(self) -> None:
        for waiter in list(self._queue):
            if waiter.future.done():
                self._queue.remove(waiter)
                continue
            slot = choose(self.slots, waiter.prompt, self.similarity, waiter.pinned)
            if slot is None:
                if all(s.busy for s in self.slots):
                    return
                continue
            self._queue.remove(waiter)
            waiter.future.set_result(self._take(slot))
