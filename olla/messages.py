"""What a handler of olla's server (olla.server) gets and gives back: a Request, and a Response or a Stream.

A handler never sets Content-Length, Transfer-Encoding or Connection, nor CR or
LF in a header: the server frames every response itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from multidict import CIMultiDictProxy

from olla import wire
from olla.body import Body, decoder_for
from olla.errors import BodyTimeout, BodyTooLarge

if TYPE_CHECKING:
    from olla.server import Connection

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
Headers = list[tuple[str, str]]
NO_BODY = frozenset((204, 304))  # and 1xx: no body, no Content-Length


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
        self._body = Body(head.length, head.chunked)
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
        decoder = decoder_for(self.headers.get("Content-Encoding"), limit)
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
