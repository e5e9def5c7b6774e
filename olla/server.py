"""HTTP/1.1 to clients on asyncio protocols: the server under the app, as `http1` is the client under `upstream`.

aiohttp's server cost about 66 µs of CPU per proxied request even at its lowest
layer, more than olla's whole budget allows (bench/results/overhead-notes.md).
This one does what serving olla's routes needs and nothing else:

- One request at a time per connection (a pipelined request waits in the buffer
  until the answer before it is complete); keep-alive by HTTP/1.1 and 1.0 rules.
- The head is parsed by `wire.parse_head` (pure); what it refuses gets an
  OpenAI-shaped JSON answer with `Connection: close`, logged at INFO on
  `olla.server`, and never reaches the handler.
- `Expect: 100-continue` is met when the handler first reads the body (so a request
  refused before that never gets the 100); any other expectation is answered 417
  before the handler.
- Request bodies by Content-Length or chunked coding; `Content-Encoding: gzip`,
  `deflate` and `identity` are decoded by `Request.read`; its limit counts
  decoded bytes.
- Responses: a whole `Response` goes out in one write with its Content-Length; a
  `Stream` with chunked coding (close-delimited for an HTTP/1.0 client), and its
  writes wait while the client's socket buffer is full. The server frames every
  response itself: a handler never sets Content-Length, Transfer-Encoding or
  Connection (nor CR or LF in a header).
- HEAD_TIMEOUT is the keep-alive timer: armed when a connection opens and after
  each response, not pushed back by arriving bytes, disarmed while a request is
  handled. On expiry the connection closes unanswered.
- After an answer that closes the connection, the server sends its FIN and reads
  and drops what the client still sends for up to LINGER seconds: a close with
  unread bytes would reset the connection, and the client could lose the answer.
- A client that leaves while its request is handled has its handler task cancelled
  (its FIN counts as leaving, as under aiohttp: a half-closed client is not answered).
- A handler that raises gets a JSON 500 (its traceback logged at ERROR on
  `olla.server`); after a streamed head, the connection is cut instead.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from multidict import CIMultiDictProxy

from olla import wire
from olla.errors import BodyTimeout, BodyTooLarge, MalformedRequest, RequestFailed

HEAD_TIMEOUT = 30.0
BACKLOG = 128
HIGH_WATER, LOW_WATER = 256 * 1024, 64 * 1024  # read no more while this much is unread, resume below the low mark
LINGER = 2.0
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
NO_BODY = frozenset((204, 304))  # and 1xx
Headers = list[tuple[str, str]]

log = logging.getLogger("olla.server")


class Request:
    """One request whose head has arrived; its body is read with `read`."""

    __slots__ = ("_body", "_connection", "_expect", "_keep_alive", "_read", "_sent", "headers", "method", "path",
                 "query_string", "raw_path", "remote", "scheme", "state", "target", "version")  # fmt: skip

    def __init__(self, connection: Connection, head: wire.Head) -> None:
        self.method = head.method  # as sent, e.g. "POST"
        self.target = head.target  # the request target as sent: raw path and query
        self.raw_path = head.raw_path  # the target's path, as sent (percent-escapes kept)
        self.path = head.path  # raw_path percent-decoded (what access logs and error messages show)
        self.query_string = head.query_string  # the target's query as sent, without "?"; "" for none
        self.version = head.version  # "HTTP/1.1" or "HTTP/1.0"
        self.headers = CIMultiDictProxy(head.headers)
        self.remote = connection.remote  # the peer's address
        self.scheme = "http"
        self.state: Any = None  # what the app keeps for this request (olla's: its Exchange); None until set
        self._connection = connection
        self._body = wire.Body(head.length, head.chunked)
        self._expect = head.expect_continue
        self._keep_alive = head.keep_alive
        self._read = False
        self._sent = False  # a response head has gone out

    async def read(self, limit: int, timeout: float) -> bytes:
        """The whole body, decoded from its Content-Encoding.

        Sends `100 Continue` first when the client asked for it and no body byte has
        arrived. Raises (all from olla.errors):
        - BodyTooLarge (413) when the Content-Length or the decoded bytes exceed `limit`;
        - BodyTimeout (408) when no byte arrives for `timeout` seconds;
        - MalformedRequest (400) for broken chunked framing (logged at INFO, as the server's refusals);
        - InvalidRequest (400, "request body could not be read: ...", naming the encoding)
          for a body that does not decode or an encoding olla does not decode;
        - ConnectionResetError when the client has gone.
        A second call returns b"" (the body is read once).
        """
        if self._read:
            return b""
        self._read = True
        body, connection = self._body, self._connection
        if body.length > limit:
            raise BodyTooLarge(f"request body of {body.length} bytes exceeds the limit of {limit} bytes")
        decoder = wire.decoder(self.headers.get("Content-Encoding"), limit)
        if self._expect and not connection.buffer and not body.done and not self._sent and not connection.lost:
            connection.transport.write(CONTINUE)
        data = connection.take(body)
        if body.done and decoder is None and len(data) <= limit:
            return data  # the usual: the body came with the head
        parts, size = [], 0
        while True:
            size += len(data)
            if size > limit:
                raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            parts.append(data if decoder is None else decoder.feed(data))
            if body.done:
                break
            if connection.lost:
                raise ConnectionResetError("the client closed the connection")
            if not await connection.more(timeout):
                raise BodyTimeout(f"no byte of the request body arrived for {timeout:g}s")
            data = connection.take(body)
        if decoder is not None:
            parts.append(decoder.end())
        return b"".join(parts)

    async def stream(self, status: int, reason: str, headers: Headers) -> Stream:
        """Send a streamed response's head (after the server's `prepare` hook); write its body with the Stream."""
        if self._sent:
            raise RuntimeError("this request's response head has already gone out")
        connection = self._connection
        if connection.lost:
            raise ConnectionResetError("the client closed the connection")
        bodied = status >= 200 and status not in NO_BODY
        chunked = self.version == "HTTP/1.1"
        keep_alive = self._keep_alive and chunked
        framing = "Transfer-Encoding: chunked\r\n" if chunked and bodied else ""
        keep_alive = connection.send_head(self, status, reason, headers, framing, keep_alive, b"")
        return Stream(connection, status, chunked, bodied and self.method != "HEAD", keep_alive)


class Response:
    """A whole response: head and body go out in one write, with Content-Length (no body for HEAD, 1xx, 204, 304)."""

    __slots__ = ("body", "close", "headers", "reason", "status")

    def __init__(self, status: int, body: bytes = b"", headers: Headers | None = None, reason: str = "",
                 close: bool = False) -> None:  # fmt: skip
        self.status = status
        self.reason = reason  # "" : the standard phrase for the status
        self.headers = headers if headers is not None else []
        self.body = body
        self.close = close  # close the connection after it


class Stream:
    """A response being streamed; its head has gone out."""

    __slots__ = ("_body", "_chunked", "_connection", "_ended", "_keep_alive", "status")

    def __init__(self, connection: Connection, status: int, chunked: bool, body: bool, keep_alive: bool) -> None:
        self.status = status
        self._connection = connection
        self._chunked = chunked  # else close-delimited (HTTP/1.0)
        self._body = body  # else HEAD, 1xx, 204 or 304: writes send nothing
        self._keep_alive = keep_alive
        self._ended = False

    async def write(self, data: bytes) -> None:
        """Send `data` as one chunk (nothing for b""); waits while the client reads slowly.

        Raises ConnectionResetError when the client has gone.
        """
        connection = self._connection
        if connection.lost:
            raise ConnectionResetError("the client closed the connection")
        if self._ended:
            raise RuntimeError("write after the stream's end")
        if data and self._body:
            connection.transport.write(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
            await connection.drained()
            if connection.lost:
                raise ConnectionResetError("the client closed the connection")

    def cut(self) -> None:
        """End the body short: the connection closes without the last chunk, so the client sees it broken off."""
        if not self._ended:
            self._ended = True
            self._connection.cut()

    async def end(self) -> None:
        """Send the last chunk; the connection then serves the next request (or closes). Idempotent."""
        if not self._ended and self._chunked and self._body and not self._connection.lost:
            self._connection.transport.write(b"0\r\n\r\n")
        self._ended = True


Handler = Callable[[Request], Awaitable[Response | Stream]]
# Called with each response head the handler makes, whole or streamed, just before it is sent; it may add headers.
Prepare = Callable[[Request, int, Headers], None]


class Connection(asyncio.Protocol):
    """One client connection: its buffer, the request being handled and the keep-alive timer."""

    transport: asyncio.Transport  # from connection_made on

    def __init__(self, server: Server) -> None:
        self._server = server
        self._loop = server.loop
        self.remote: str | None = None
        self.buffer = bytearray()  # what has arrived and is not consumed yet
        self.lost = False
        self.writing_paused = False
        self.task: asyncio.Task[None] | None = None  # the request's, while one is handled
        self._request: Request | None = None
        self._scan = wire.HeadScan()
        self._closing = False  # no further request: the connection lingers or is closed
        self._reading_paused = False
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # when the timer closes the connection (while no request is handled)
        self._waiter: asyncio.Future[bool] | None = None  # a body read waiting for bytes
        self._drain: asyncio.Future[None] | None = None  # a stream write waiting for the client to read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) else None
        self._server.connections.add(self)
        if self._server.stopping:
            self.cut()
        else:
            self._arm(self._server.head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return  # lingering: dropped
        self.buffer += data
        if self._request is None:
            self._next()
        elif self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)
        if len(self.buffer) > HIGH_WATER and self._request is not None and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # the client's FIN: it has left (as under aiohttp), and its handler is cancelled

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = self._closing = True
        self._server.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(True)  # the reader sees `lost`
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drained(self) -> None:
        """Wait, if the client reads slowly, until it has read enough for writes to go on (or has gone)."""
        if self.writing_paused and not self.lost:
            self._drain = self._loop.create_future()
            await self._drain

    async def more(self, timeout: float) -> bool:
        """Wait for more bytes (or the client leaving); False if none came for `timeout` seconds."""
        waiter: asyncio.Future[bool] = self._loop.create_future()
        self._waiter = waiter
        timer = self._loop.call_later(timeout, _expire, waiter)
        try:
            return await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def take(self, body: wire.Body) -> bytes:
        """The body's bytes that have arrived, taken out of the buffer (reading resumes once it is low)."""
        try:
            data = body.take(self.buffer)
        except MalformedRequest as failure:  # logged as the server's refusals are; the app answers it
            log.info("malformed request", extra={"status": failure.status, "error": failure.message})
            raise
        if self._reading_paused and len(self.buffer) < LOW_WATER:
            self._reading_paused = False
            self.transport.resume_reading()
        return data

    def _next(self) -> None:
        """Handle the next request if its head has arrived."""
        buffer = self.buffer
        while buffer.startswith(b"\r\n"):
            del buffer[:2]
        if self._server.stopping:
            self.cut()
            return
        try:
            end = self._scan.end(buffer)
            if end < 0:
                return
            head = wire.parse_head(buffer[:end])
        except RequestFailed as failure:
            log.info("malformed request", extra={"status": failure.status, "error": failure.message})
            self._close(wire.answer(failure))
            return
        del buffer[: end + 4]
        self._request = request = Request(self, head)
        self.task = self._loop.create_task(self._serve(request))

    async def _serve(self, request: Request) -> None:
        try:
            answer = await self._server.handler(request)
            if isinstance(answer, Response):
                if request._sent:
                    raise RuntimeError("the handler returned a Response after it had begun a Stream")
                keep_alive = self._respond(request, answer)
            elif isinstance(answer, Stream):
                await answer.end()
                keep_alive = (answer._keep_alive and not self._closing and not self._server.stopping
                              and request._body.discard(self.buffer))  # fmt: skip
            else:
                raise TypeError(f"the handler returned a {type(answer).__name__}, not a Response or a Stream")
            if keep_alive:
                await self.drained()  # a pipelined request waits until the client reads this answer
        except asyncio.CancelledError:  # the client left, or the server stopped waiting for the handler
            self.cut()
            return
        except Exception:
            log.exception("handler failed")
            if request._sent:
                self.cut()
            else:
                self._close(wire.answer(RequestFailed("olla failed on this request; its log has the details")))
            return
        self._request = None
        if not keep_alive or self.lost:
            self._close(b"")
        else:
            self._arm(self._server.head_timeout)
            if self.buffer:
                self._next()

    def _respond(self, request: Request, response: Response) -> bool:
        """Send a whole response; whether the connection stays open after it."""
        status, body = response.status, response.body
        keep_alive = request._keep_alive and not response.close and request._body.discard(self.buffer)
        if status < 200 or status in NO_BODY:
            framing, body = "", b""
        else:
            framing = f"Content-Length: {len(body)}\r\n"
            if request.method == "HEAD":
                body = b""
        return self.send_head(request, status, response.reason, response.headers, framing, keep_alive, body)

    def send_head(self, request: Request, status: int, reason: str, headers: Headers, framing: str,
                  keep_alive: bool, body: bytes) -> bool:  # fmt: skip
        """Send a response head (and `body`) after the prepare hook; whether the connection stays open after it."""
        prepare = self._server.prepare
        if prepare is not None:
            headers = list(headers)  # the handler's list may be shared: the hook's headers are this response's
            prepare(request, status, headers)
        keep_alive = keep_alive and not self._server.stopping
        if not keep_alive:
            framing += "Connection: close\r\n"
        elif request.version == "HTTP/1.0":
            framing += "Connection: keep-alive\r\n"
        head = wire.response_head(status, reason, headers, framing)
        request._sent = True
        if not self.lost:
            self.transport.write(head + body if body else head)
        return keep_alive

    def _arm(self, timeout: float) -> None:
        """Close the connection in `timeout` seconds unless a request is then being handled."""
        self._deadline = self._loop.time() + timeout
        if self._timer is None:  # else it fires earlier, and sets itself again for the new deadline
            self._timer = self._loop.call_at(self._deadline, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.lost or self._request is not None:
            return  # armed again after the response
        if self._deadline - self._loop.time() > 0.005:
            self._timer = self._loop.call_at(self._deadline, self._expired)
        else:
            self.transport.close()

    def _close(self, last: bytes) -> None:
        """Send `last`, then FIN; drop what the client still sends for LINGER seconds, then close."""
        self._closing = True
        self._request = None
        self.buffer.clear()
        transport = self.transport
        if self.lost:
            return
        if last:
            transport.write(last)
        if not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._arm(LINGER)

    def cut(self) -> None:
        """Close now, after what has been written (a streamed body ends short)."""
        self._closing = True
        self._request = None
        if not self.lost:
            self.transport.close()

    def shutdown(self) -> None:
        """The server stops: close now if no request is handled, else after its response."""
        if self._request is None:
            self.cut()


def _expire(waiter: asyncio.Future[bool]) -> None:
    if not waiter.done():
        waiter.set_result(False)


class Server:
    """`await Server.start(handler, host, port)`; `await stop()` drains it."""

    listener: asyncio.Server

    def __init__(self, handler: Handler, prepare: Prepare | None, head_timeout: float, shutdown_timeout: float) -> None:
        # Read by its connections.
        self.loop = asyncio.get_running_loop()
        self.handler = handler
        self.prepare = prepare
        self.head_timeout = head_timeout
        self.shutdown_timeout = shutdown_timeout
        self.connections: set[Connection] = set()
        self.stopping = False

    @classmethod
    async def start(cls, handler: Handler, host: str, port: int, *, prepare: Prepare | None = None,
                    head_timeout: float = HEAD_TIMEOUT, shutdown_timeout: float = 10.0) -> Server:  # fmt: skip
        server = cls(handler, prepare, head_timeout, shutdown_timeout)
        server.listener = await server.loop.create_server(lambda: Connection(server), host, port, backlog=BACKLOG)
        return server

    @property
    def port(self) -> int:
        return int(self.listener.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop accepting; idle connections close; requests in flight get `shutdown_timeout`, then are cancelled."""
        self.stopping = True
        self.listener.close()
        for connection in list(self.connections):
            connection.shutdown()
        tasks = {c.task for c in self.connections if c.task is not None and not c.task.done()}
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self.shutdown_timeout)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for connection in list(self.connections):
            connection.transport.close()
        await asyncio.sleep(0)  # their connection_lost runs
