"""Log lines: JSON or text, one per line on stdout; and the access log, written straight to the same stream.

Every line carries time, level, logger, message and the record's extra fields.
The access log (logger name `olla.access`, one line per request) has the same
shape but does not go through `logging`: a LogRecord, the handler's lock and the
formatter cost about 40 µs of the ~400 µs the router spends on a proxied
request; the line written here costs about 5 µs (bench/results/overhead-notes.md).
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from typing import Any, TextIO

import orjson

RECORD_FIELDS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}
JSON_TIME, TEXT_TIME = "%Y-%m-%dT%H:%M:%S", "%H:%M:%S"
FLUSH_EVERY = 0.05  # seconds an access-log line may wait for others to go out with it
MAX_PENDING = 1000  # lines


def json_line(when: str, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
    entry = {"time": when, "level": level, "logger": logger, "message": message, **fields}
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:  # a lone surrogate (a client's undecodable byte): escaped, rather than the line lost
        return json.dumps(entry, default=str)


def text_line(when: str, level: str, logger: str, message: str, fields: dict[str, Any]) -> str:
    extra = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
    return f"{when} {level.upper():<7} {logger}: {message} {extra}".rstrip()


def _text(value: object) -> str:
    """A field value on one line: a client's path may hold a decoded newline that would forge a log line."""
    text = str(value)
    return text if text.isprintable() else repr(text)


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in RECORD_FIELDS}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and every `extra` field."""

    def format(self, record: logging.LogRecord) -> str:
        fields = _extra(record)
        if record.exc_info:
            fields["exception"] = self.formatException(record.exc_info)
        when = self.formatTime(record, JSON_TIME)
        return json_line(when, record.levelname.lower(), record.name, record.getMessage(), fields)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = self.formatTime(record, TEXT_TIME)
        return text_line(when, record.levelname, record.name, record.getMessage(), _extra(record))


class AccessLog:
    """The `olla.access` lines: written when the log level lets info through, else skipped.

    Lines go out together, at most FLUSH_EVERY seconds after the first of them was
    written (or at once when MAX_PENDING are waiting): a write system call per line,
    or per turn of the event loop, was the largest single cost left in a request
    (bench/results/overhead-notes.md). `flush` writes what is pending at once.
    """

    def __init__(self) -> None:
        self.stream: TextIO | None = None  # None: off (the router's tests read it by configuring one)
        self._line, self._time = json_line, JSON_TIME
        self._second, self._when = -1, ""
        self._pending: list[str] = []

    def configure(self, stream: TextIO | None, level: str = "info", fmt: str = "json") -> None:
        self.flush()
        on = logging.getLevelName(level.upper()) <= logging.INFO
        self.stream = stream if on else None
        self._line, self._time = (json_line, JSON_TIME) if fmt == "json" else (text_line, TEXT_TIME)
        self._second = -1

    def write(self, fields: dict[str, Any]) -> None:
        if self.stream is None:
            return
        second = int(time.time())
        if second != self._second:  # the stamp has whole seconds: strftime was ~2 µs a line under load
            self._second, self._when = second, time.strftime(self._time, time.localtime(second))
        pending = self._pending
        pending.append(self._line(self._when, "info", "olla.access", "request", fields) + "\n")
        if len(pending) == 1:
            try:
                asyncio.get_running_loop().call_later(FLUSH_EVERY, self.flush)
            except RuntimeError:  # no loop running: at once
                self.flush()
        elif len(pending) >= MAX_PENDING:
            self.flush()

    def flush(self) -> None:
        """Write the lines not written yet."""
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        if self.stream is not None:
            self.stream.write("".join(lines))
            self.stream.flush()


access = AccessLog()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    access.configure(sys.stdout, level, fmt)
