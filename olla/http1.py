"""HTTP/1.1 to endpoints on asyncio protocols: the client under upstream.py.

aiohttp's client cost about 80 µs of CPU per proxied request, a quarter of the
router's (bench/results/overhead-notes.md); this one does what talking to a
llama.cpp endpoint needs and nothing else: requests carry a whole body with its
Content-Length; responses are framed by Content-Length, chunked coding or the
close, and passed on as they come (no decompression, redirects, cookies or
proxies); idle connections are kept per origin, newest reused first, closed after
`keepalive` seconds; `https://` endpoints get TLS with certificate checks.

Failures are OSError (Closed: the endpoint closed the connection; ConnectTimeout)
or Malformed (a response that is not HTTP/1.x); upstream.py translates them.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from olla.alarms import Alarms
from olla.body import Body

MAX_HEAD = 64 * 1024  # a response head (status line and headers) larger than this is refused
HIGH_WATER, LOW_WATER = 256 * 1024, 64 * 1024  # read no more while this much is unread, resume below the low mark
NO_BODY = frozenset((204, 304))


class Closed(ConnectionError):
    """The endpoint closed the connection before the response was complete; the message is the OS's reason, if any."""

    def __init__(self, reason: str = "", reused: bool = False) -> None:
        super().__init__(reason)
        self.reused = reused  # the connection had carried an earlier request


class ConnectTimeout(TimeoutError):
    pass


class Malformed(ValueError):
    """The endpoint's answer breaks HTTP/1.1."""


@dataclass(frozen=True, eq=False)  # compared by identity: `split` makes one object per origin
class Origin:
    scheme: str
    host: str
    port: int
    host_header: str


_origins: dict[tuple[str, str, int, str], Origin] = {}


@functools.lru_cache(maxsize=1024)
def split(url: str) -> tuple[Origin, str]:
    """An absolute http(s) URL's origin and request target (path and query)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    fields = (parts.scheme, host, port, shown if port == default else f"{shown}:{port}")
    origin = _origins.setdefault(fields, Origin(*fields))  # (split is cached: this runs once per URL)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return origin, target


class Connection(asyncio.Protocol):
    """One TCP (or TLS) connection: what it has received and not yet consumed, and whether it is closed."""

    def __init__(self, origin: Origin) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0
        self.on_lost: list[Connection] | None = None  # the idle list it sits in, if any
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        return False  # the endpoint is done sending: close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        if self.on_lost is not None and self in self.on_lost:
            self.on_lost.remove(self)
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def more(self, alarms: Alarms | None = None, deadline: float | None = None) -> None:
        """Wait until more bytes arrive or the connection closes; TimeoutError at `deadline` (with `alarms`)."""
        if self.closed:
            return
        self._waiter = waiter = asyncio.get_running_loop().create_future()
        try:
            await (waiter if alarms is None or deadline is None else alarms.wait(waiter, deadline))
        finally:
            self._waiter = None

    def take(self, n: int) -> bytes:
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        self.consumed()
        return data

    def consumed(self) -> None:
        """Bytes were taken out of the buffer: read again once it is low."""
        if self._paused and len(self.buffer) < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def parse_head(buffer: bytearray) -> tuple[int, str, list[tuple[str, str]], bool, int] | None:
    """The response head at the buffer's start: (status, reason, header pairs, keep-alive, length); None if incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD:
            raise Malformed(f"response head larger than {MAX_HEAD} bytes")
        return None
    lines = buffer[:end].decode("utf-8", "surrogateescape").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if version not in ("HTTP/1.1", "HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise Malformed(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
    pairs = []
    connection = ""
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise Malformed(f"bad header line: {line[:80]!r}")
        value = value.strip(" \t")
        pairs.append((name, value))
        if name.lower() == "connection":
            connection += "," + value.lower()
    keep_alive = "close" not in connection if version == "HTTP/1.1" else "keep-alive" in connection
    return int(code), reason, pairs, keep_alive, end + 4


# How a body ends.
LENGTH, CHUNKED, UNTIL_CLOSE, NONE = range(4)


class Response:
    """A response whose head has arrived; its body is read with `take` and `more`, or `read`."""

    def __init__(self, client: Client, connection: Connection, status: int, reason: str,
                 pairs: list[tuple[str, str]], keep_alive: bool, method: str, reused: bool) -> None:  # fmt: skip
        self.status = status
        self.reused = reused  # it came on a kept-alive connection
        self.reason = reason
        self.raw_headers = pairs  # the header lines as sent, in order (what a proxy relays)
        headers: CIMultiDict[str] = CIMultiDict(pairs)
        self.headers = CIMultiDictProxy(headers)
        self._client = client
        self._connection: Connection | None = connection
        self._keep_alive = keep_alive
        self._remaining = 0
        self._chunks = Body(0, True, Malformed)  # read when the framing is CHUNKED
        coding = headers.get("Transfer-Encoding")
        if method == "HEAD" or status in NO_BODY:
            self._framing = NONE
        elif coding is not None:
            self._framing = CHUNKED if coding.lower().rstrip().endswith("chunked") else UNTIL_CLOSE
        elif "Content-Length" in headers:
            lengths = {v.strip() for v in headers.getall("Content-Length")}
            length = lengths.pop()
            if lengths or not length.isdigit():
                raise Malformed(f"bad Content-Length: {', '.join(headers.getall('Content-Length'))}")
            self._framing, self._remaining = LENGTH, int(length)
        else:
            self._framing = UNTIL_CLOSE
        if self._framing == UNTIL_CLOSE:
            self._keep_alive = False
        if self._framing == NONE or (self._framing == LENGTH and self._remaining == 0):
            self._finish()

    def take(self) -> bytes | None:
        """The body's next piece from what has arrived; b"" at its end; None when more must arrive first."""
        connection = self._connection
        if connection is None:
            return b""
        buffer = connection.buffer
        if self._framing == LENGTH:
            n = min(self._remaining, len(buffer))
            if n:
                self._remaining -= n
                data = connection.take(n)
                if not self._remaining:
                    self._finish()
                return data
        elif self._framing == CHUNKED:
            # Everything that has arrived, in one piece (a write to the client for each chunk would cost more);
            # before a broken framing, the data goes first and the next call raises Malformed.
            data = self._chunks.take(buffer)
            connection.consumed()
            if self._chunks.done:
                self._finish()
                return data
            if data:
                return data
        elif buffer:
            return connection.take(len(buffer))
        elif connection.closed and connection.error is None:
            self._finish()  # UNTIL_CLOSE: the close is the end
            return b""
        if connection.closed:
            raise Closed(str(connection.error or ""))
        return None

    def whole(self) -> bytes | None:
        """The body, when its Content-Length says it has all arrived; else None, and nothing is taken."""
        connection = self._connection
        if connection is None:
            return b"" if self._framing in (NONE, LENGTH) else None
        if self._framing != LENGTH or len(connection.buffer) < self._remaining:
            return None
        return self.take()

    async def more(self, deadline: float | None = None) -> None:
        """Wait for more of the body to arrive (or the connection to close); TimeoutError at `deadline`."""
        if self._connection is not None:
            await self._connection.more(self._client.alarms, deadline)

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body, or its first `limit` bytes (the connection is then closed)."""
        parts: list[bytes] = []
        size = 0
        while limit is None or size < limit:
            data = self.take()
            if data is None:
                await self.more()
                continue
            if not data:
                break
            parts.append(data)
            size += len(data)
        self.close()  # nothing if the body ended; else the rest stays unread
        body = b"".join(parts)
        return body if limit is None else body[:limit]

    def close(self) -> None:
        """Stop reading: a connection with an unread body cannot carry another request."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            if self._keep_alive and not connection.buffer and not connection.closed:
                self._client.release(connection)
            else:
                connection.close()


class Client:
    """Connections to every endpoint, kept alive between requests."""

    def __init__(self, keepalive: float, tls: ssl.SSLContext | None = None) -> None:
        self.keepalive = keepalive
        self.alarms = Alarms()  # the deadlines of waits for answers
        self._tls = tls
        self._idle: dict[Origin, list[Connection]] = {}

    async def request(
        self, method: str, url: str, headers: Mapping[str, str] | list[tuple[str, str]], body: bytes,
        connect_timeout: float, fresh: bool = False, deadline: float | None = None, close: bool = False,
    ) -> Response:  # fmt: skip
        """Send a request and wait for the response's head (`fresh`: never on a kept-alive connection).

        `headers` (a mapping or pairs) never hold Host, Content-Length or Connection: the client sets them,
        `Connection: close` when `close` asks the endpoint to close the connection after its answer.

        TimeoutError when the head has not arrived by `deadline` (`time.monotonic()`); ConnectTimeout when a
        new connection takes longer than `connect_timeout`, unless the deadline comes first.
        """
        origin, target = split(url)
        connection = None if fresh else self._reuse(origin)
        reused = connection is not None
        if connection is None:
            connection = await self._connect(origin, connect_timeout, deadline)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        pairs = headers if isinstance(headers, list) else headers.items()  # (not isinstance Mapping: an ABC is slow)
        lines.extend(f"{name}: {value}\r\n" for name, value in pairs)  # both sources allow no CR or LF
        if body or method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(body)}\r\n")
        if close:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        try:
            request = "".join(lines).encode("utf-8", "surrogateescape") + body
            cast(asyncio.Transport, connection.transport).write(request)
            while True:
                head = parse_head(connection.buffer)
                if head is None:
                    if connection.closed:
                        raise Closed(str(connection.error or ""), reused)
                    await connection.more(self.alarms, deadline)
                    continue
                status, reason, pairs, keep_alive, length = head
                del connection.buffer[:length]
                if status >= 200 or status == 101:
                    keep_alive = keep_alive and not close
                    return Response(self, connection, status, reason, pairs, keep_alive, method, reused)
        except BaseException:
            connection.close()
            raise

    def _reuse(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            connection.on_lost = None
            # Bytes on an idle connection were never asked for (a server's 408 before it hangs up): not an answer.
            if not connection.closed and not connection.buffer and now - connection.idle_since < self.keepalive:
                return connection
            connection.close()
        return None

    async def _connect(self, origin: Origin, timeout: float, deadline: float | None) -> Connection:
        loop = asyncio.get_running_loop()
        if origin.scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        tls = self._tls if origin.scheme == "https" else None
        remaining = deadline - time.monotonic() if deadline is not None else timeout
        try:
            async with asyncio.timeout(min(timeout, remaining)):
                _, connection = await loop.create_connection(
                    lambda: Connection(origin), origin.host, origin.port, ssl=tls,
                    server_hostname=origin.host if tls else None,
                )  # fmt: skip
        except TimeoutError as exc:
            if remaining < timeout:
                raise  # the deadline, not the connect timeout
            raise ConnectTimeout(f"no connection within {timeout:g}s") from exc
        return connection

    def release(self, connection: Connection) -> None:
        connection.idle_since = now = time.monotonic()
        idle = self._idle.setdefault(connection.origin, [])
        while idle and now - idle[0].idle_since >= self.keepalive:  # the oldest first: expired ones go as traffic flows
            expired = idle.pop(0)
            expired.on_lost = None
            expired.close()
        idle.append(connection)
        connection.on_lost = idle

    def close(self) -> None:
        for idle in self._idle.values():
            for connection in idle:
                connection.on_lost = None
                connection.close()
        self._idle.clear()

