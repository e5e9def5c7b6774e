"""Coarse timers for the request path: one loop timer every TICK for all of them, not one loop timer each.

Every request set two timers and cancelled them: the deadline of the wait for the
endpoint's answer, and the hold of a conversation's slot. On uvloop a loop timer
is a libuv handle made, started, stopped and closed each time; taking the
deadline's timer out saved about 30 µs of the router's 160 µs per request
(bench/results/overhead-notes.md). An alarm here is an entry in a set, looked
at by one sweep every TICK while any is pending.

An alarm goes off up to TICK after its time, never before it. The router's
timeouts are seconds long, so that is nothing; the waits that need precision
(a client's request head or body, the endpoint's connect) keep loop timers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

TICK = 0.05
T = TypeVar("T")


class Alarm:
    __slots__ = ("alarms", "args", "callback", "when")

    def __init__(self, alarms: Alarms, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.alarms = alarms
        self.when = when
        self.callback = callback
        self.args = args

    def cancel(self) -> None:
        self.alarms.pending.discard(self)  # the sweep goes on until one finds nothing pending: no timer per alarm


class Alarms:
    """Callbacks at `time.monotonic()` times, run by one sweep every TICK while any is pending."""

    def __init__(self) -> None:
        self.pending: set[Alarm] = set()
        self.sweep: asyncio.TimerHandle | None = None

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Alarm:
        alarm = Alarm(self, when, callback, args)
        self.pending.add(alarm)
        if self.sweep is None:
            self.sweep = asyncio.get_running_loop().call_later(TICK, self._run)
        return alarm

    async def wait(self, future: asyncio.Future[T], when: float) -> T:
        """The future's result; TimeoutError, set on the future, if it is not done by `when`."""
        alarm = self.call_at(when, _expire, future)
        try:
            return await future
        finally:
            alarm.cancel()

    def _run(self) -> None:
        now = time.monotonic()
        due = [alarm for alarm in self.pending if alarm.when <= now]
        self.pending.difference_update(due)
        self.sweep = asyncio.get_running_loop().call_later(TICK, self._run) if self.pending else None
        for alarm in due:
            alarm.callback(*alarm.args)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
