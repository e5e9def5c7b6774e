"""olla.alarms: coarse timers go off after their time, within a tick, never before; the sweep stops when idle."""

from __future__ import annotations

import asyncio
import time

import pytest

from olla.alarms import TICK, Alarms


async def test_an_alarm_goes_off_after_its_time_within_a_tick() -> None:
    alarms = Alarms()
    fired: list[float] = []
    when = time.monotonic() + 0.12
    alarms.call_at(when, lambda: fired.append(time.monotonic()))
    await asyncio.sleep(0.12 + 3 * TICK)
    assert len(fired) == 1 and when <= fired[0] < when + TICK + 0.05  # margin for a loaded machine


async def test_a_cancelled_alarm_never_goes_off_and_the_sweep_stops() -> None:
    alarms = Alarms()
    fired: list[str] = []
    alarm = alarms.call_at(time.monotonic() + 0.05, fired.append, "cancelled")
    alarms.call_at(time.monotonic() + 0.05, fired.append, "kept")
    alarm.cancel()
    await asyncio.sleep(0.05 + 3 * TICK)
    assert fired == ["kept"]
    assert not alarms.pending and alarms.sweep is None  # idle: no loop timer left running


async def test_wait_returns_the_result_or_times_out_at_the_deadline() -> None:
    alarms = Alarms()
    loop = asyncio.get_running_loop()
    future: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.02, future.set_result, "done")
    assert await alarms.wait(future, time.monotonic() + 1.0) == "done"
    assert not alarms.pending

    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await alarms.wait(loop.create_future(), started + 0.1)
    assert 0.1 <= time.monotonic() - started < 0.1 + TICK + 0.2


async def test_an_alarm_set_in_the_past_goes_off_at_the_next_sweep() -> None:
    alarms = Alarms()
    fired: list[int] = []
    alarms.call_at(time.monotonic() - 1.0, fired.append, 1)
    await asyncio.sleep(2 * TICK)
    assert fired == [1]
