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
from typing import cast

from olla import wire
from olla.body import Body
from olla.errors import MalformedRequest, RequestFailed
from olla.messages import NO_BODY, Headers, Request, Response, Stream

HEAD_TIMEOUT = 30.0
BACKLOG = 128
HIGH_WATER, LOW_WATER = 256 * 1024, 64 * 1024  # read no more while this much is unread, resume below the low mark
LINGER = 2.0

log = logging.getLogger("olla.server")


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

    def take(self, body: Body) -> bytes:
        """The body's bytes that have arrived, taken out of the buffer (reading resumes once it is low)."""
        try:
            data = body.take(self.buffer)
            if data and self.buffer and not body.done:
                data += body.take(self.buffer)  # a broken framing behind the data: a request's is refused at once
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
