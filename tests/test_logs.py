"""The access log: its time stamp (once a second, always the second the line was written in), and its writes."""

from __future__ import annotations

import asyncio
import io
import time

import orjson
import pytest

from olla import logs
from olla.logs import FLUSH_EVERY, JSON_TIME, MAX_PENDING, TEXT_TIME, AccessLog


def test_each_line_carries_the_second_it_was_written_in(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1_790_000_000.2]
    monkeypatch.setattr(logs.time, "time", lambda: now[0])
    stream = io.StringIO()
    access = AccessLog()
    access.configure(stream, "info", "json")
    for now[0] in (1_790_000_000.2, 1_790_000_000.9, 1_790_000_001.0, 1_790_000_061.5):
        access.write({"status": 200})
    stamps = [orjson.loads(line)["time"] for line in stream.getvalue().splitlines()]
    expected = [time.strftime(JSON_TIME, time.localtime(s)) for s in (1_790_000_000, 1_790_000_000, 1_790_000_001,
                                                                       1_790_000_061)]  # fmt: skip
    assert stamps == expected and stamps[1] != stamps[2] != stamps[3]
    access.configure(stream, "info", "text")  # a new format makes its own stamp at once
    access.write({"status": 200})
    assert stream.getvalue().splitlines()[-1].startswith(time.strftime(TEXT_TIME, time.localtime(1_790_000_061)) + " ")


class Writes(io.StringIO):
    """A stream that counts its writes."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


async def test_lines_go_out_together_within_flush_every_of_the_first() -> None:
    stream = Writes()
    access = AccessLog()
    access.configure(stream, "info", "json")
    access.write({"status": 200})
    await asyncio.sleep(0)
    for status in (404, 503):
        access.write({"status": status})
    await asyncio.sleep(0)
    assert stream.getvalue() == ""  # not yet: they wait for others to go out with them
    await asyncio.sleep(FLUSH_EVERY * 2)
    assert [orjson.loads(line)["status"] for line in stream.getvalue().splitlines()] == [200, 404, 503]
    assert stream.writes == 1
    access.write({"status": 201})
    access.configure(None)  # turning the log off (or changing it) writes what is pending first
    assert orjson.loads(stream.getvalue().splitlines()[-1])["status"] == 201 and stream.writes == 2


async def test_a_full_batch_goes_out_at_once() -> None:
    stream = Writes()
    access = AccessLog()
    access.configure(stream, "info", "json")
    for status in range(MAX_PENDING):
        access.write({"status": status})
    assert stream.writes == 1 and len(stream.getvalue().splitlines()) == MAX_PENDING
    access.write({"status": -1})
    assert stream.writes == 1  # the next batch waits again
    access.flush()
    assert stream.writes == 2 and orjson.loads(stream.getvalue().splitlines()[-1])["status"] == -1


def test_without_a_running_loop_a_line_is_written_at_once() -> None:
    stream = io.StringIO()
    access = AccessLog()
    access.configure(stream, "info", "text")
    access.write({"status": 200})
    assert "status=200" in stream.getvalue()
