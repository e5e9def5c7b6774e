"""The access log's time stamp: made once a second, and always the second the line was written in."""

from __future__ import annotations

import io
import time

import orjson
import pytest

from olla import logs
from olla.logs import JSON_TIME, TEXT_TIME, AccessLog


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
