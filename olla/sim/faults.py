"""Failures an emulated server can be told to show, one name each.

    refuse        stop listening (connection refused) and close keep-alive connections once
                  idle; requests in flight finish; clearing listens again on the same port
    crash         stop listening and drop every connection, like a killed process;
                  clearing restarts it: empty caches, loading for `load_seconds` again
    loading       answer every path 503 "Loading model", as during startup
    hang_headers  generation routes accept the request and never answer
    hang_stream   generation sends `after` tokens, then goes silent with the connection open
    cut_stream    generation sends `after` tokens, then drops the TCP connection
    status        generation routes answer `status` (e.g. 500, 502, 503) with an error body
    slow_decode   generation waits `delay` seconds more before each token, as an overloaded
                  or throttled server would
    slow_health   /health answers after `delay` seconds
    fail_health   /health answers 500

"Generation routes" are the ones that take a slot: completions, chat, infill,
embeddings (which have no tokens to count, so hang_stream, cut_stream and
slow_decode pass them by). A request without streaming that meets hang_stream
or cut_stream hangs or is cut before any header, since its body only exists
once it is done.
Any fault takes `duration` (seconds) to clear itself, e.g. a crash and restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NAMES = (
    "refuse",
    "crash",
    "loading",
    "hang_headers",
    "hang_stream",
    "cut_stream",
    "status",
    "slow_decode",
    "slow_health",
    "fail_health",
)
LISTENER_FAULTS = ("refuse", "crash")


@dataclass(frozen=True)
class Fault:
    name: str
    after: int = 2
    status: int = 503
    message: str = "Service unavailable (injected fault)"
    delay: float = 5.0
    duration: float | None = None

    @classmethod
    def parse(cls, name: Any, **params: Any) -> Fault:
        """A fault from its name and parameters; ValueError names what is wrong."""
        if name not in NAMES:
            raise ValueError(f"unknown fault {name!r}; known: {', '.join(NAMES)}")
        known = {"after", "status", "message", "delay", "duration"}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown fault parameters: {', '.join(unknown)}")
        fault = cls(name, **params)
        if not isinstance(fault.after, int) or fault.after < 0:
            raise ValueError("after must be a non-negative integer")
        if not isinstance(fault.status, int) or not 400 <= fault.status <= 599:
            raise ValueError("status must be an HTTP error status (400-599)")
        if not isinstance(fault.message, str):
            raise ValueError("message must be a string")
        if not isinstance(fault.delay, (int, float)) or fault.delay < 0:
            raise ValueError("delay must be a non-negative number of seconds")
        if fault.duration is not None and (not isinstance(fault.duration, (int, float)) or fault.duration <= 0):
            raise ValueError("duration must be a positive number of seconds")
        if name == "status" and "message" not in params:
            fault = cls(name, **params, message=_MESSAGES.get(fault.status, "Injected fault"))
        return fault


_MESSAGES = {
    500: "Internal server error (injected fault)",
    502: "Bad gateway (injected fault)",
    503: "Service unavailable (injected fault)",
}
