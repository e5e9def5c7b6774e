"""wrk posting one JSON chat request over and over; its Lua `done()` reports what the table needs as JSON."""

from __future__ import annotations

import subprocess
import tempfile
from dataclasses import dataclass
from typing import Any

import orjson

SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [==[%s]==]
%s

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '\\nRESULT {"requests": %%d, "seconds": %%f, "errors": %%d, "non_2xx": %%d, "p50_us": %%d, "p99_us": %%d}\\n',
    summary.requests, summary.duration / 1e6, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Run:
    """One wrk run: latency to the last byte of each response."""

    requests: int
    seconds: float
    errors: int  # connect, read, write and timeout errors, plus non-2xx answers
    p50_ms: float
    p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds


def wrk(url: str, body: dict[str, Any], connections: int, seconds: float, headers: dict[str, str] | None = None) -> Run:
    extra = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in (headers or {}).items())
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(SCRIPT % (orjson.dumps(body).decode(), extra))
        script.flush()
        args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--timeout", "10s", "-s", script.name, url]
        done = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    r = orjson.loads(line.removeprefix("RESULT "))
    return Run(r["requests"], r["seconds"], r["errors"] + r["non_2xx"], r["p50_us"] / 1000, r["p99_us"] / 1000)


