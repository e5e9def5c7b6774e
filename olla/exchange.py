"""One client request from receipt to last byte, and the front every request passes through.

`Front` is the server's handler (olla.server): it makes the request's Exchange,
runs admission and the matched route, and is the one place a RequestFailed
becomes an OpenAI-shaped JSON error, and the one place the access log line and
the request metrics are written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from olla import logs
from olla.clients import ANONYMOUS
from olla.errors import RequestFailed, ShuttingDown
from olla.messages import Request, Response, Stream
from olla.metrics import Metrics
from olla.wire import VIA

log = logging.getLogger("olla.exchange")
REQUEST_ID_LIMIT = 128
# Request ids need to be unique, not secret: secrets.token_hex (a getrandom call) was 2% of the router's CPU.
_ids = random.Random(os.urandom(16))
Answer = Response | Stream


@dataclass(slots=True)
class Exchange:
    request_id: str
    started: float
    route: str = "other"
    client: str | None = None  # the authenticated caller's id; never its key
    model: str | None = None  # as the client named it
    model_id: str | None = None  # the endpoint's id for it: the metrics label
    endpoint: str | None = None
    attempts: int = 0
    status: int = 0
    bytes_sent: int = 0
    ttfb: float | None = None
    strategy: str | None = None  # the balancer's name once the request reached routing; then the
    decision: str = "rejected"  # X-Olla-Routing-* headers tell how it was routed
    reason: str = "model_unavailable"
    rate_headers: Mapping[str, str] | None = None  # X-RateLimit-* for its answer, set by admission

    def elapsed_ms(self, now: float | None = None) -> float:
        return ((now if now is not None else time.monotonic()) - self.started) * 1000


class Traffic:
    """Requests in flight, and whether the router is draining (new requests then get 503)."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self._idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self._idle.set()

    async def idle(self) -> None:
        await self._idle.wait()


def request_id(request: Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= REQUEST_ID_LIMIT and given.isprintable():
        return given
    return f"{_ids.getrandbits(64):016x}"


def error_response(exc: RequestFailed, exchange: Exchange) -> Response:
    headers = [("Content-Type", "application/json"), ("Via", VIA)]
    if exc.retry_after is not None:
        headers.append(("Retry-After", str(exc.retry_after)))
    headers += exc.headers().items()
    if exchange.strategy is not None:
        headers += [("X-Olla-Routing-Strategy", exchange.strategy), ("X-Olla-Routing-Decision", exchange.decision),
                    ("X-Olla-Routing-Reason", exchange.reason)]  # fmt: skip
    return Response(exc.status, orjson.dumps(exc.body()), headers)


Dispatch = Callable[[Request, Exchange], Awaitable[Answer]]


class Front:
    """The server's handler: an Exchange per request around `dispatch`, errors rendered, the request logged and counted.

    `prepare` is the server's hook for every answer's head, streamed ones included:
    `X-Olla-Request-Id`, then what `admission` adds (rate-limit and CORS headers).
    """

    def __init__(self, dispatch: Dispatch, metrics: Metrics, traffic: Traffic,
                 admit_headers: Callable[[Request, Exchange, list[tuple[str, str]]], None]) -> None:  # fmt: skip
        self.dispatch = dispatch
        self.metrics = metrics
        self.traffic = traffic
        self.admit_headers = admit_headers

    def prepare(self, request: Request, status: int, headers: list[tuple[str, str]]) -> None:
        exchange: Exchange = request.state
        headers.append(("X-Olla-Request-Id", exchange.request_id))
        self.admit_headers(request, exchange, headers)

    async def __call__(self, request: Request) -> Answer:
        exchange = Exchange(request_id(request), time.monotonic())
        request.state = exchange
        if self.traffic.draining:
            response = error_response(ShuttingDown("olla is shutting down; retry on another instance"), exchange)
            response.close = True
            return self._finish(request, exchange, response)
        self.traffic.enter()
        try:
            try:
                answer = await self.dispatch(request, exchange)
            except RequestFailed as exc:
                answer = error_response(exc, exchange)
            except (ConnectionResetError, asyncio.CancelledError):
                exchange.status = exchange.status or 499  # the client left; nothing more can be sent
                finish(exchange, request, self.metrics)
                raise
            return self._finish(request, exchange, answer)
        finally:
            self.traffic.leave()

    def _finish(self, request: Request, exchange: Exchange, answer: Answer) -> Answer:
        exchange.status = answer.status
        if isinstance(answer, Response):
            exchange.bytes_sent = exchange.bytes_sent or len(answer.body)
        finish(exchange, request, self.metrics)  # a whole answer goes out as this returns, in one write
        return answer


def finish(exchange: Exchange, request: Request, metrics: Metrics) -> None:
    now = time.monotonic()
    metrics.answered(exchange.endpoint or "", exchange.model_id or "", exchange.route, exchange.status,
                     exchange.client or ANONYMOUS, now - exchange.started)  # fmt: skip
    if logs.access.stream is not None:
        logs.access.write({
            "request_id": exchange.request_id, "method": request.method, "path": request.path,
            "client": exchange.client, "model": exchange.model, "endpoint": exchange.endpoint,
            "status": exchange.status,
            "bytes": exchange.bytes_sent, "ms": round(exchange.elapsed_ms(now), 1),
            "ttfb_ms": round(exchange.ttfb * 1000, 1) if exchange.ttfb is not None else None,
            "attempts": exchange.attempts,
        })  # fmt: skip
