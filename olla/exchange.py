"""One client request from receipt to last byte, and the middleware around every request.

The middleware is the one place a RequestFailed becomes an OpenAI-shaped JSON
error, and the one place the access log line and the request metrics are
written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from olla import __version__, logs
from olla.clients import ANONYMOUS
from olla.errors import MethodNotAllowed, RequestFailed, RouteNotFound, ShuttingDown
from olla.metrics import Metrics

log = logging.getLogger("olla.exchange")
VIA = f"1.1 olla/{__version__}"
REQUEST_ID_LIMIT = 128
# Request ids need to be unique, not secret: secrets.token_hex (a getrandom call) was 2% of the router's CPU.
_ids = random.Random(os.urandom(16))


@dataclass
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

    def elapsed_ms(self, now: float | None = None) -> float:
        return ((now if now is not None else time.monotonic()) - self.started) * 1000


EXCHANGE = web.RequestKey("exchange", Exchange)


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


def request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-Id", "")
    if given and len(given) <= REQUEST_ID_LIMIT and given.isprintable():
        return given
    return f"{_ids.getrandbits(64):016x}"


def error_response(exc: RequestFailed, exchange: Exchange) -> web.Response:
    headers = {"X-Olla-Request-Id": exchange.request_id, "Via": VIA}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(exc.retry_after)
    headers.update(exc.headers())
    if exchange.strategy is not None:
        headers["X-Olla-Routing-Strategy"] = exchange.strategy
        headers["X-Olla-Routing-Decision"] = exchange.decision
        headers["X-Olla-Routing-Reason"] = exchange.reason
    return web.Response(
        status=exc.status, body=orjson.dumps(exc.body()), content_type="application/json", headers=headers
    )


def _translated(exc: web.HTTPException, request: web.Request) -> RequestFailed:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return MethodNotAllowed(f"{request.method} is not allowed on {request.path}; use {allowed}")
    if exc.status == 404:
        return RouteNotFound(f"{request.method} {request.path} is not served by olla")
    failure = RequestFailed(exc.reason)
    failure.status, failure.code = exc.status, exc.reason.lower().replace(" ", "_")
    failure.type = "invalid_request_error"
    return failure


def middleware(metrics: Metrics, traffic: Traffic):  # type: ignore[no-untyped-def]
    @web.middleware
    async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        exchange = Exchange(request_id(request), time.monotonic())
        request[EXCHANGE] = exchange
        if traffic.draining:
            response = error_response(ShuttingDown("olla is shutting down; retry on another instance"), exchange)
            response.force_close()
            exchange.status = response.status
            finish(exchange, request, metrics)
            return response
        traffic.enter()
        try:
            return await _handle(request, handler, exchange, metrics)
        finally:
            traffic.leave()

    return exchange_middleware


async def _handle(request: web.Request, handler: Handler, exchange: Exchange, metrics: Metrics) -> web.StreamResponse:
    """Run the handler; render a RequestFailed (or aiohttp's own 404/405) as OpenAI JSON; log and count it."""
    try:
        response = await handler(request)
    except RequestFailed as exc:
        response = error_response(exc, exchange)
    except web.HTTPException as exc:  # aiohttp's own 404/405 for paths outside every route
        response = error_response(_translated(exc, request), exchange)
        if isinstance(exc, web.HTTPMethodNotAllowed):
            response.headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    except ConnectionResetError:
        exchange.status = exchange.status or 499  # the client left; nothing more can be sent
        finish(exchange, request, metrics)
        raise
    exchange.status = response.status
    if not response.prepared:
        response.headers.setdefault("X-Olla-Request-Id", exchange.request_id)
        exchange.bytes_sent = exchange.bytes_sent or (response.content_length or 0)
        try:  # sent now rather than by aiohttp after we return: the log line and metrics then follow the last byte
            await response.prepare(request)
            await response.write_eof()
        finally:
            finish(exchange, request, metrics)
        return response
    finish(exchange, request, metrics)
    return response


def finish(exchange: Exchange, request: web.Request, metrics: Metrics) -> None:
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
