"""The listener: the socket and connection handler in front of the app, and the limits on what a client sends first.

aiohttp reads the request line and headers itself, before the app and its
middleware, and answers what it cannot parse in plain text, logging it at ERROR
with a traceback; it offers no hook to change that (aio-libs/aiohttp#3287), and
`web.Server` always builds a plain `RequestHandler`. So the listener opens the
socket itself (as the emulator does) and serves each connection with
`JsonErrors`, aiohttp's handler with its public `handle_error` overridden: such
a request gets OpenAI-shaped JSON and one INFO line. A crash gets a JSON 500,
its traceback still logged at ERROR. An `Expect` other than `100-continue` is
answered here too: aiohttp's own 417 echoes the value and fails on non-UTF-8.

Limits, enforced by aiohttp's parser (aiohttp's defaults, pinned here):

    request line              MAX_LINE_SIZE bytes     431 header_too_large
    one header value          MAX_FIELD_SIZE bytes    431 header_too_large
    headers in one request    MAX_HEADERS             400 malformed_request
    time to a complete head   HEAD_TIMEOUT seconds    the connection is closed, unanswered

HEAD_TIMEOUT is aiohttp's keep-alive timer: armed when a connection opens and
after each response, not pushed back by arriving bytes, and disarmed while a
request is handled. So one bound cuts off a client that sends its headers a byte
at a time, and an idle keep-alive connection, without limiting how long a
request may run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import HttpVersion11, web
from aiohttp.http_exceptions import (
    BadHttpMethod, BadStatusLine, ContentEncodingError, HttpProcessingError, InvalidHeader, InvalidURLError,
    LineTooLong,
)  # fmt: skip

from olla.errors import InvalidRequest, RequestFailed
from olla.exchange import VIA

MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
HEAD_TIMEOUT = 30.0
BACKLOG = 128  # as aiohttp's TCPSite

log = logging.getLogger("olla.listener")
Handler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]


class MalformedRequest(InvalidRequest):
    """Not a valid HTTP/1.x request: aiohttp's parser refused it."""

    code = "malformed_request"


class HeadTooLarge(InvalidRequest):
    status = 431
    code = "header_too_large"


class ExpectationFailed(InvalidRequest):
    status = 417
    code = "expectation_failed"


def handler_args(head_timeout: float = HEAD_TIMEOUT) -> dict[str, Any]:
    """The limits as aiohttp's RequestHandler arguments (also accepted by `web.AppRunner`)."""
    return {"max_line_size": MAX_LINE_SIZE, "max_field_size": MAX_FIELD_SIZE, "max_headers": MAX_HEADERS,
            "keepalive_timeout": head_timeout}  # fmt: skip


def refusal(exc: HttpProcessingError) -> InvalidRequest:
    """The answer to a request aiohttp could not parse; its message never echoes the client's bytes."""
    if isinstance(exc, LineTooLong):
        return HeadTooLarge(f"the request line or a header is longer than {exc.args[1]} bytes")
    first = exc.message.split("\n", 1)[0]
    if isinstance(exc, ContentEncodingError):
        reason = "the body does not decode as its Content-Encoding says, or olla cannot decode that encoding"
    elif first.endswith(":"):  # llhttp's reason; the offending bytes follow on the next lines
        reason = first[:-1]
    elif isinstance(exc, BadHttpMethod):
        reason = "TLS sent to a plain HTTP port" if first.startswith("Received HTTPS") else "unknown method"
    elif isinstance(exc, BadStatusLine):
        reason = "invalid request line"
    elif isinstance(exc, InvalidHeader):
        reason = "invalid header"
    elif isinstance(exc, InvalidURLError):
        reason = "invalid request target"
    else:
        reason = first  # aiohttp's own fixed text, e.g. "Too many headers received"
    return MalformedRequest(f"malformed HTTP request: {reason}")


class JsonErrors(web.RequestHandler):
    """aiohttp's connection handler, answering what it refuses itself in OpenAI's shape."""

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        failure: RequestFailed
        if isinstance(exc, HttpProcessingError):
            failure = refusal(exc)
            log.info("malformed request", extra={"status": failure.status, "error": failure.message})
        else:
            super().handle_error(request, status, exc, message)  # logs the crash; raises if bytes went out
            failure = RequestFailed("olla failed on this request; its log has the details")
            failure.status = status
        return _answer(failure)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        # After a handler refused a broken body (bad chunk framing, undecodable gzip), aiohttp
        # drains the rest, meets the same error again and logs it as unhandled: it is the client's.
        if isinstance(kw.get("exc_info"), web.RequestPayloadError):
            log.info("broken request body", extra={"error": str(kw["exc_info"]).splitlines()[-1].strip()})
            return
        super().log_exception(*args, **kw)


def _answer(failure: RequestFailed) -> web.Response:
    response = web.Response(
        status=failure.status, body=orjson.dumps(failure.body()), content_type="application/json",
        headers={"Via": VIA},
    )  # fmt: skip
    response.force_close()
    return response


def _expectations(handler: Handler) -> Handler:
    """Refuse an unknown `Expect` before the app: aiohttp's own 417 echoes the value and fails (500) on non-UTF-8."""

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        expect = request.headers.get("Expect")
        if expect is not None and request.version == HttpVersion11 and expect.lower() != "100-continue":
            return _answer(ExpectationFailed("the only expectation olla meets is Expect: 100-continue"))
        return await handler(request)

    return handle


class Listener:
    """An app served on one socket: `await Listener.start(app, host, port)`; `await stop()` drains it."""

    def __init__(self, runner: web.AppRunner, server: asyncio.Server) -> None:
        self.runner = runner
        self.server = server

    @classmethod
    async def start(
        cls, app: web.Application, host: str, port: int, *, shutdown_timeout: float = 10.0,
        head_timeout: float = HEAD_TIMEOUT,
    ) -> Listener:  # fmt: skip
        args = handler_args(head_timeout)
        runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=shutdown_timeout, access_log=None,
                               **args)  # fmt: skip
        await runner.setup()
        loop = asyncio.get_running_loop()
        manager = runner.server
        if manager is None:
            raise RuntimeError("the app runner did not set up its server")
        manager.request_handler = _expectations(manager.request_handler)  # each connection reads it when made

        own: dict[str, Any] = {**args, "access_log": None, "logger": log}  # olla writes its own access log

        def connection() -> JsonErrors:
            return JsonErrors(manager, loop=loop, **own)

        try:
            server = await loop.create_server(connection, host, port, backlog=BACKLOG)
        except OSError:
            await runner.cleanup()
            raise
        return cls(runner, server)

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; idle connections close, requests in flight get `shutdown_timeout` to finish."""
        self.server.close()
        await self.runner.cleanup()
