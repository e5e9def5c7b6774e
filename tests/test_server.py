"""The HTTP/1.1 server under the app: framing, keep-alive, bodies, refusals, streaming, shutdown, real clients.

Most tests talk raw bytes over loopback to a Server with a small handler, and
check what a client sees: status, headers, body, when the connection closes.
Splits of a request stream are fed straight to a connection (hypothesis); the
socket-level scenarios in UVLOOP run again under uvloop, as `olla serve` runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import logging
import socket
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import aiohttp
import orjson
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from olla import wire
from olla.body import Body, Decoder
from olla.errors import MalformedRequest, RequestFailed
from olla.messages import Request, Response, Stream
from olla.server import HIGH_WATER, Connection, Server
from tests.rawhttp import Answer

LIMIT = 1 << 20
JSON = [("Content-Type", "application/json")]
END = b"\r\n\r\n"


# --- helpers ----------------------------------------------------------------------------


def raw(method: str = "GET", target: str | bytes = "/", body: bytes = b"", headers: Iterable[str | bytes] = (),
        *, length: bool | None = None, version: str = "HTTP/1.1") -> bytes:  # fmt: skip
    """One request's bytes, with Host, and Content-Length for a body or a POST unless `length` says otherwise."""
    target = target.encode() if isinstance(target, str) else target
    lines = [method.encode() + b" " + target + b" " + version.encode(), b"Host: olla.test"]
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    if length or (length is None and (body or method == "POST")):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + END + body


def chunked(body: bytes, size: int = 3) -> bytes:
    pieces = [b"%x;ext=1\r\n%s\r\n" % (len(body[i:i + size]), body[i:i + size]) for i in range(0, len(body), size)]
    return b"".join(pieces) + b"0\r\nX-Trailer: t\r\n\r\n"


def parse_head(data: bytes) -> Answer:
    status_line, *lines = data[:-4].decode("latin-1").split("\r\n")
    assert status_line.startswith("HTTP/1.1 "), status_line
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, _, value = line.partition(":")
        headers.add(name, value.strip())
    return Answer(int(status_line.split(" ")[1]), headers, b"")


async def read_answer(reader: asyncio.StreamReader, method: str = "GET") -> Answer:
    """One answer, framed as its head says (close-delimited: until EOF); interim 100s skipped."""
    answer = parse_head(await reader.readuntil(END))
    while answer.status == 100:
        answer = parse_head(await reader.readuntil(END))
    if method == "HEAD" or answer.status in (204, 304):
        return answer
    if answer.headers.get("Transfer-Encoding") == "chunked":
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        assert await reader.readexactly(2) == b"\r\n"
        answer.body = bytes(body)
    elif "Content-Length" in answer.headers:
        answer.body = await reader.readexactly(int(answer.headers["Content-Length"]))
    else:
        answer.body = await reader.read()
    return answer


@contextlib.asynccontextmanager
async def connect(port: int, rcvbuf: int | None = None) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                                                 asyncio.StreamWriter]]:  # fmt: skip
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def ask(port: int, data: bytes) -> Answer:
    """Send `data` on a new connection; the answer."""
    async with connect(port) as (reader, writer):
        writer.write(data)
        async with asyncio.timeout(5):
            return await read_answer(reader)


async def ask_closing(port: int, data: bytes) -> Answer:
    """Send `data` on a new connection; the answer, after which the server closes the connection."""
    async with connect(port) as (reader, writer):
        writer.write(data)
        async with asyncio.timeout(5):
            answer = await read_answer(reader)
        assert await closed_within(reader, 2) is not None
        return answer


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> float | None:
    """Seconds until the server closed the connection (None: still open after `seconds`); bytes sent are dropped."""
    started = time.monotonic()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
            return time.monotonic() - started
    return None


async def echo(request: Request) -> Response:
    """What the request said, as JSON; a body it cannot read is answered as the app answers it."""
    try:
        body = await request.read(LIMIT, 0.5)
    except RequestFailed as exc:
        return Response(exc.status, orjson.dumps(exc.body()), list(JSON))
    return Response(200, orjson.dumps({
        "method": request.method, "target": request.target, "raw_path": request.raw_path, "path": request.path,
        "query": request.query_string, "version": request.version, "remote": request.remote,
        "body": body.decode("latin-1"),  # header bytes that are not UTF-8 are shown as their hex
        "headers": [[name, value.encode("utf-8", "surrogateescape").hex() if not value.isascii() else value]
                    for name, value in request.headers.items()],
    }), list(JSON))  # fmt: skip


@contextlib.asynccontextmanager
async def serving(handler: Callable[[Request], Awaitable[Response | Stream]] = echo,
                  **options: Any) -> AsyncIterator[Server]:  # fmt: skip
    server = await Server.start(handler, "127.0.0.1", 0, **options)
    try:
        yield server
    finally:
        await server.stop()


def errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR]


# --- keep-alive and framing ---------------------------------------------------------------


async def test_one_connection_carries_request_after_request() -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        for i in range(5):
            writer.write(raw("POST", f"/v1/x{i}?q={i}", b'{"n": %d}' % i))
            answer = await read_answer(reader)
            assert answer.status == 200 and "Connection" not in answer.headers
            seen = answer.json()
            assert (seen["path"], seen["query"], seen["body"]) == (f"/v1/x{i}", f"q={i}", f'{{"n": {i}}}')
            assert seen["remote"] == "127.0.0.1" and len(server.connections) == 1
        assert "Date" in answer.headers and answer.headers["Content-Length"] == str(len(answer.body))


async def test_pipelined_requests_are_answered_in_order_one_at_a_time() -> None:
    active, most = 0, 0

    async def slow(request: Request) -> Response:
        nonlocal active, most
        active += 1
        most = max(most, active)
        await asyncio.sleep(0.02)
        active -= 1
        return await echo(request)

    requests = raw("GET", "/a") + raw("POST", "/b", b"bee") + raw("POST", "/c", chunked(b"sea"), [
        "Transfer-Encoding: chunked"], length=False) + b"\r\n" + raw("GET", "/d")  # fmt: skip
    async with serving(slow) as server, connect(server.port) as (reader, writer), asyncio.timeout(5):
        writer.write(requests)
        seen = [(await read_answer(reader)).json() for _ in range(4)]
    assert [(s["path"], s["body"]) for s in seen] == [("/a", ""), ("/b", "bee"), ("/c", "sea"), ("/d", "")]
    assert most == 1


async def test_http10_closes_unless_asked_to_keep_alive() -> None:
    async with serving() as server:
        answer = await ask_closing(server.port, b"GET /old HTTP/1.0\r\n\r\n")
        assert answer.status == 200 and answer.json()["version"] == "HTTP/1.0"
        assert answer.headers["Connection"] == "close"
        async with connect(server.port) as (reader, writer):
            for _ in range(2):
                writer.write(b"GET /old HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                answer = await read_answer(reader)
                assert answer.status == 200 and answer.headers["Connection"] == "keep-alive"


async def test_connection_close_from_the_client_is_honoured() -> None:
    async with serving() as server:
        answer = await ask_closing(server.port, raw("GET", "/", headers=["Connection: close"]))
        assert answer.status == 200 and answer.headers["Connection"] == "close"


async def test_head_gets_the_length_without_the_body() -> None:
    async def hello(request: Request) -> Response:
        return Response(200, b"hello", [("Content-Type", "text/plain")])

    async with serving(hello) as server, connect(server.port) as (reader, writer):
        writer.write(raw("HEAD", "/") + raw("GET", "/"))
        head = await read_answer(reader, "HEAD")
        assert head.headers["Content-Length"] == "5" and head.body == b""
        assert (await read_answer(reader)).body == b"hello"  # no body bytes came between the two


@pytest.mark.parametrize("status", [204, 304])
async def test_no_content_has_no_length_and_no_body(status: int) -> None:
    async def empty(request: Request) -> Response:
        return Response(status, b"ignored")

    async with serving(empty) as server, connect(server.port) as (reader, writer):
        writer.write(raw() + raw())
        for _ in range(2):
            answer = await read_answer(reader)
            assert answer.status == status and "Content-Length" not in answer.headers


async def test_reason_date_and_the_handlers_headers() -> None:
    async def custom(request: Request) -> Response:
        if request.path == "/dated":
            return Response(200, b"", [("Date", "Thu, 01 Jan 1970 00:00:00 GMT")])
        return Response(299 if request.path == "/odd" else 418, reason="Short" if request.path == "/short" else "")

    async with serving(custom) as server, connect(server.port) as (reader, writer):
        writer.write(raw("GET", "/odd") + raw("GET", "/tea") + raw("GET", "/short") + raw("GET", "/dated"))
        heads = [(await reader.readuntil(END)).split(b"\r\n") for _ in range(4)]
    assert [h[0] for h in heads] == [b"HTTP/1.1 299 Unknown", b"HTTP/1.1 418 I'm a Teapot", b"HTTP/1.1 418 Short",
                                     b"HTTP/1.1 200 OK"]  # fmt: skip
    assert [line for line in heads[3] if line.startswith(b"Date:")] == [b"Date: Thu, 01 Jan 1970 00:00:00 GMT"]


async def test_targets_leading_empty_lines_and_undecodable_headers() -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        writer.write(b"\r\n\r\n" + raw("GET", "/a%2Fb%20c?x=%26") + raw("GET", "http://olla.test/v1/m?y=1")
                     + raw("OPTIONS", "*") + raw("GET", "/", headers=[b"X-Bytes: \xff\xfe", "X-Tab: a\tb  "]))
        first, absolute, star, latin = [(await read_answer(reader)).json() for _ in range(4)]
    assert (first["raw_path"], first["path"], first["query"]) == ("/a%2Fb%20c", "/a/b c", "x=%26")
    assert (absolute["raw_path"], absolute["query"]) == ("/v1/m", "y=1")
    assert absolute["target"] == "http://olla.test/v1/m?y=1"
    assert star["raw_path"] == "*"
    # Bytes that are not UTF-8 reach the handler as surrogates, which encode back to the bytes sent.
    assert ["X-Bytes", "fffe"] in latin["headers"] and ["X-Tab", "a\tb"] in latin["headers"]


# --- bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_body_sent_a_byte_at_a_time(framing: str) -> None:
    body = b'{"prompt": "' + bytes(range(32, 127)) + b'"}'
    data = raw("POST", "/b", body) if framing == "length" else raw(
        "POST", "/b", chunked(body, 7), ["Transfer-Encoding: chunked"], length=False)  # fmt: skip
    async with serving() as server, connect(server.port) as (reader, writer):
        for byte in data + raw("GET", "/next"):
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.0005)
        assert (await read_answer(reader)).json()["body"] == body.decode()
        assert (await read_answer(reader)).json()["path"] == "/next"


def _deflate(data: bytes, wbits: int) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("encoding, encode", [
    ("gzip", gzip.compress), ("x-gzip", gzip.compress), ("GZIP", lambda d: gzip.compress(d[:9]) + gzip.compress(d[9:])),
    ("deflate", lambda d: _deflate(d, 15)), ("deflate", lambda d: _deflate(d, -15)), ("identity", lambda d: d),
])  # fmt: skip
async def test_a_compressed_body_is_decoded(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    document = b'{"messages": [{"role": "user", "content": "' + b"hi " * 500 + b'"}]}'
    encoded = encode(document)
    async with serving() as server:
        answer = await ask(server.port, raw("POST", "/", encoded, [f"Content-Encoding: {encoding}"]))
        assert answer.json()["body"] == document.decode()
        answer = await ask(server.port, raw("POST", "/", chunked(encoded, 5), [
            f"Content-Encoding: {encoding}", "Transfer-Encoding: chunked"], length=False))  # fmt: skip
        assert answer.json()["body"] == document.decode()


async def test_a_gzip_bomb_is_refused_without_inflating_it() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000, 9)
    async with serving() as server:
        started = time.monotonic()
        answer = await ask(server.port, raw("POST", "/", bomb, ["Content-Encoding: gzip"]))
        assert answer.status == 413 and answer.error["message"] == f"request body exceeds the limit of {LIMIT} bytes"
        assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("encoding, body, message", [
    ("gzip", b"not gzip at all", "request body could not be read: the gzip body does not decode"),
    ("gzip", gzip.compress(b"x" * 1000)[:-12], "request body could not be read: the gzip body does not decode"),
    ("deflate", b"\xff\xff\xff", "request body could not be read: the deflate body does not decode"),
    ("br", b"\x0b\x02\x80hello\x03", "request body could not be read: olla does not decode Content-Encoding br"),
    ("zstd", b"x", "request body could not be read: olla does not decode Content-Encoding zstd"),
    ("sk-secret-" + "x" * 40, b"x",
     "request body could not be read: olla does not decode Content-Encoding of that kind"),
])  # fmt: skip
async def test_a_body_that_does_not_decode_is_refused(encoding: str, body: bytes, message: str) -> None:
    async with serving() as server:
        answer = await ask(server.port, raw("POST", "/", body, [f"Content-Encoding: {encoding}"]))
    assert (answer.status, answer.error["code"], answer.error["message"]) == (400, "invalid_request", message)


async def test_a_content_length_over_the_limit_is_refused_before_the_body_arrives() -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", headers=["Content-Length: 10000000"], length=False) + b"{" * 1000)
        async with asyncio.timeout(2):
            answer = await read_answer(reader)
        assert answer.status == 413 and answer.headers["Connection"] == "close"
        assert answer.error["message"] == f"request body of 10000000 bytes exceeds the limit of {LIMIT} bytes"
        assert await closed_within(reader, 2) is not None


@pytest.mark.parametrize("limit", [4, LIMIT])  # all in one read, or as it arrives
async def test_a_chunked_body_over_the_limit_is_refused(limit: int) -> None:
    async def small(request: Request) -> Response:
        try:
            return Response(200, await request.read(limit, 1))
        except RequestFailed as exc:
            return Response(exc.status, orjson.dumps(exc.body()), list(JSON))

    async with serving(small) as server:
        body = chunked(b"x" * (limit + 1), min(limit, 65536))
        answer = await ask(server.port, raw("POST", "/", body, ["Transfer-Encoding: chunked"], length=False))
    assert answer.status == 413 and answer.error["message"] == f"request body exceeds the limit of {limit} bytes"


@pytest.mark.parametrize("body", [b"zz\r\nab\r\n0\r\n\r\n", b"3\r\nabcX\r\n0\r\n\r\n", b"-1\r\n", b"0x3\r\nabc\r\n"])
async def test_broken_chunked_framing_is_refused(caplog: pytest.LogCaptureFixture, body: bytes) -> None:
    caplog.set_level(logging.INFO, logger="olla.server")
    async with serving() as server:
        answer = await ask_closing(server.port, raw("POST", "/", body, ["Transfer-Encoding: chunked"], length=False))
    assert answer.status == 400 and answer.error["code"] == "malformed_request"
    assert answer.error["message"].startswith("malformed HTTP request: invalid chunk")
    (record,) = [r for r in caplog.records if r.name == "olla.server"]
    assert (record.levelno, record.getMessage(), record.error) == (  # type: ignore[attr-defined]
        logging.INFO, "malformed request", answer.error["message"])


async def test_a_body_that_stops_arriving_gets_408_and_a_slow_one_does_not() -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        started = time.monotonic()
        writer.write(raw("POST", "/", headers=["Content-Length: 100"], length=False) + b'{"mo')
        async with asyncio.timeout(3):
            answer = await read_answer(reader)
        assert answer.status == 408 and answer.error["message"] == "no byte of the request body arrived for 0.5s"
        assert 0.45 <= time.monotonic() - started < 2.0
    async with serving() as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", headers=["Content-Length: 10"], length=False))
        for _ in range(5):  # 1.5 s in all, no gap as long as the timeout
            await asyncio.sleep(0.3)
            writer.write(b"ab")
        assert (await read_answer(reader)).json()["body"] == "ababababab"


async def test_a_body_is_read_once_and_without_waiting_when_it_came_with_the_head(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    waits = 0
    more = Connection.more

    async def counted(self: Connection, timeout: float) -> bool:
        nonlocal waits
        waits += 1
        return await more(self, timeout)

    async def twice(request: Request) -> Response:
        return Response(200, b"%r %r" % (await request.read(LIMIT, 1), await request.read(LIMIT, 1)))

    monkeypatch.setattr(Connection, "more", counted)
    async with serving(twice) as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", b"whole") + raw("GET", "/"))
        assert [(await read_answer(reader)).body for _ in range(2)] == [b"b'whole' b''", b"b'' b''"]
        assert waits == 0
        writer.write(raw("POST", "/", headers=["Content-Length: 4"], length=False))
        await asyncio.sleep(0.05)
        writer.write(b"late")
        assert (await read_answer(reader)).body == b"b'late' b''" and waits == 1


async def test_100_continue_is_sent_when_the_body_is_first_read() -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", headers=["Content-Length: 5", "Expect: 100-continue"], length=False))
        async with asyncio.timeout(2):
            assert await reader.readuntil(END) == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        assert (await read_answer(reader)).json()["body"] == "hello"
        writer.write(raw("POST", "/", b"early", ["Expect: 100-continue"]))  # the body came along: no 100
        assert (await reader.readuntil(END)).startswith(b"HTTP/1.1 200 OK")


async def test_no_100_continue_for_a_request_refused_unread() -> None:
    async def refuse(request: Request) -> Response:
        return Response(401, b"{}", list(JSON))

    async with serving(refuse) as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", headers=["Content-Length: 5", "Expect: 100-continue"], length=False))
        assert (await reader.readuntil(END)).startswith(b"HTTP/1.1 401 Unauthorized")
        assert await closed_within(reader, 2) is not None  # the body never came: the connection cannot go on


async def test_an_unread_body_is_dropped_if_it_has_arrived_else_the_connection_closes() -> None:
    async def ignore(request: Request) -> Response:
        return Response(200, request.path.encode())

    async with serving(ignore) as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/1", b"x" * 1000) + raw("POST", "/2", chunked(b"y" * 100),
                                                          ["Transfer-Encoding: chunked"], length=False))  # fmt: skip
        writer.write(raw("POST", "/3", headers=["Content-Length: 100000"], length=False) + b"z" * 10)
        assert [(await read_answer(reader)).body for _ in range(2)] == [b"/1", b"/2"]
        last = await read_answer(reader)
        assert last.body == b"/3" and last.headers["Connection"] == "close"
        assert await closed_within(reader, 2) is not None


async def test_an_unread_body_is_held_to_the_high_water_mark() -> None:
    go = asyncio.Event()

    async def later(request: Request) -> Response:
        await go.wait()
        return Response(200, b"%d" % len(await request.read(8 * LIMIT, 5)))

    async with serving(later) as server, connect(server.port) as (reader, writer):
        writer.write(raw("POST", "/", b"b" * (4 * LIMIT)))
        await asyncio.sleep(0.3)
        (connection,) = server.connections
        assert len(connection.buffer) < 2 * HIGH_WATER  # the rest waits in the socket buffers
        go.set()
        assert (await read_answer(reader)).body == b"%d" % (4 * LIMIT)


# --- what the server refuses before the handler -------------------------------------------

BIG = "a" * (wire.MAX_FIELD_SIZE + 1)
REFUSED = [
    (raw("GET", "/" + "a" * wire.MAX_LINE_SIZE), 431, "the request line or a header is longer than 8190 bytes"),
    (raw("GET", "/", headers=["X-Big: " + BIG]), 431, "the request line or a header is longer than 8190 bytes"),
    (raw("GET", "/", headers=[f"X-H{i}: v" for i in range(wire.MAX_HEADERS + 1)]), 400, "too many headers"),
    (raw("FROB"), 400, "unknown method"),
    (raw("get"), 400, "unknown method"),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\x00" * 40, 400, "TLS sent to a plain HTTP port"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "HTTP/2 is not served here, only HTTP/1.1"),
    (raw(version="HTTP/1.2"), 400, "invalid request line or HTTP version"),
    (b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400, "invalid request line or HTTP version"),
    (b"GET /\r\n\r\n", 400, "invalid request line or HTTP version"),
    (raw("GET", b"/llamacpp/\xff"), 400, "invalid request target"),
    (raw("GET", b"/health\x00"), 400, "invalid request target"),
    (raw("GET", "health"), 400, "invalid request target"),
    (raw("GET", "*"), 400, "invalid request target"),
    (raw("GET", "http:///path"), 400, "invalid request target"),
    (raw("GET", b"http://olla.test/\x7f"), 400, "invalid request target"),
    (raw("GET", "/", headers=["X-Request-Id: \x01\x02"]), 400, "invalid header"),
    (raw("GET", "/", headers=["X-Del: a\x7fb"]), 400, "invalid header"),
    (raw("GET", "/", headers=["X-Space : v"]), 400, "invalid header"),
    (raw("GET", "/", headers=["X(paren): v"]), 400, "invalid header"),
    (raw("GET", "/", headers=["no colon"]), 400, "invalid header"),
    (raw("GET", "/", headers=["X-A: v", " folded"]), 400, "obsolete line folding"),
    (b"GET / HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n", 400, "a line of the head does not end in CRLF"),
    (b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, "an HTTP/1.1 request needs exactly one Host header"),
    (raw("GET", "/", headers=["Host: again"]), 400, "an HTTP/1.1 request needs exactly one Host header"),
    (raw("POST", "/", b"{}", ["Content-Type: application/json", "content-type: text/plain"]), 400,
     "the content-type header appears more than once"),
    (raw("POST", "/", headers=["Content-Length: -1"], length=False), 400, "invalid Content-Length"),
    (raw("POST", "/", headers=["Content-Length: +1"], length=False), 400, "invalid Content-Length"),
    (raw("POST", "/", headers=["Content-Length: 1 1"], length=False), 400, "invalid Content-Length"),
    (raw("POST", "/", headers=["Content-Length: 0x1"], length=False), 400, "invalid Content-Length"),
    (raw("POST", "/", headers=["Content-Length: \u00b2".encode("latin-1")], length=False), 400,
     "invalid Content-Length"),
    (raw("POST", "/", b"ab", ["Content-Length: 3"]), 400, "invalid Content-Length"),
    (raw("POST", "/", b"{}", ["Transfer-Encoding: chunked"]), 400, "both Content-Length and Transfer-Encoding"),
    (raw("POST", "/", headers=["Transfer-Encoding: gzip"], length=False), 400,
     "the only Transfer-Encoding olla reads is chunked"),
    (raw("POST", "/", headers=["Transfer-Encoding: gzip, chunked"], length=False), 400,
     "the only Transfer-Encoding olla reads is chunked"),
    (raw("POST", "/", headers=["Transfer-Encoding: chunked"], length=False, version="HTTP/1.0"), 400,
     "Transfer-Encoding in an HTTP/1.0 request"),
    (raw("POST", "/", b"{}", ["Expect: 200-ok"]), 417, "the only expectation olla meets is Expect: 100-continue"),
]  # fmt: skip
CODES = {400: "malformed_request", 417: "expectation_failed", 431: "header_too_large"}


@pytest.mark.parametrize("data, status, message", REFUSED, ids=range(len(REFUSED)))
async def test_what_the_parser_refuses_gets_json_and_one_info_line(
    caplog: pytest.LogCaptureFixture, data: bytes, status: int, message: str
) -> None:
    caplog.set_level(logging.INFO, logger="olla.server")
    handled = []

    async def handler(request: Request) -> Response:
        handled.append(request)
        return Response(200)

    async with serving(handler) as server:
        answer = await ask_closing(server.port, data)
        assert (await ask(server.port, raw())).status == 200  # the server goes on
    full = message if status != 400 else f"malformed HTTP request: {message}"
    assert (answer.status, answer.error["code"], answer.error["message"]) == (status, CODES[status], full)
    assert answer.headers["Connection"] == "close" and answer.headers["Via"] == wire.VIA
    assert len(handled) == 1
    (record,) = [r for r in caplog.records if r.name == "olla.server"]
    assert (record.levelno, record.getMessage(), record.status, record.error) == (  # type: ignore[attr-defined]
        logging.INFO, "malformed request", status, full)
    assert not errors(caplog)


@pytest.mark.parametrize("start", [
    b"GET /" + b"a" * (wire.MAX_LINE_SIZE + 10), b"GET / HTTP/1.1\r\nX-Big: " + BIG.encode(),
    b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * (wire.MAX_HEADERS + 1), b"\x16\x03\x01\x00",
])  # fmt: skip
async def test_a_head_that_breaks_a_limit_is_refused_before_its_end(start: bytes) -> None:
    async with serving() as server, connect(server.port) as (reader, writer):
        writer.write(start)  # and nothing more
        async with asyncio.timeout(2):
            answer = await read_answer(reader)
        assert answer.status in (400, 431) and answer.headers["Connection"] == "close"


async def test_a_refusal_never_echoes_the_clients_bytes(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "sk-client-secret-" + "x" * wire.MAX_FIELD_SIZE
    async with serving() as server:
        for data in (raw("GET", "/", headers=[f"Authorization: Bearer {secret}"]),
                     raw("GET", "/", headers=[f"Authorization: Bearer {secret[:40]}\x01"]),
                     raw("GET", "/", headers=["Expect: sk-client-secret"]),
                     raw("SK-CLIENT-SECRET", "/")):  # fmt: skip
            answer = await ask(server.port, data)
            assert answer.status >= 400 and b"secret" not in answer.body.lower()
    assert not [r for r in caplog.records if "secret" in repr(r.__dict__).lower()]


# --- the keep-alive timer -------------------------------------------------------------------


async def test_a_head_sent_slowly_is_cut_off_and_an_idle_connection_closed() -> None:
    async def sleepy(request: Request) -> Response:
        await asyncio.sleep(0.8)
        return Response(200, b"late")

    async with serving(sleepy, head_timeout=0.3) as server:
        async with connect(server.port) as (reader, writer):
            started, closed_after = time.monotonic(), None
            for byte in b"GET / HTTP/1.1\r\nHost: olla.test\r\nX-Slow: " + b"a" * 100:
                writer.write(bytes([byte]))
                with contextlib.suppress(TimeoutError):
                    if await asyncio.wait_for(reader.read(1), 0.05) == b"":
                        closed_after = time.monotonic() - started
                        break
            assert closed_after is not None and 0.25 <= closed_after < 1.0, closed_after
        async with connect(server.port) as (reader, writer):
            closed = await closed_within(reader, 2)
            assert closed is not None and 0.25 <= closed < 1.0
        async with connect(server.port) as (reader, writer):  # a request may run longer; the timer restarts after it
            writer.write(raw())
            assert (await read_answer(reader)).body == b"late"
            closed = await closed_within(reader, 2)
            assert closed is not None and 0.25 <= closed < 1.0


# --- streaming -------------------------------------------------------------------------------


async def test_stream_chunks_arrive_in_order_each_before_the_next_is_written() -> None:
    steps = [asyncio.Event() for _ in range(3)]

    async def events(request: Request) -> Stream:
        stream = await request.stream(200, "", [("Content-Type", "text/event-stream")])
        for i, step in enumerate(steps):
            await stream.write(b"data: %d\n\n" % i)
            await step.wait()  # set by the client once it has the chunk
        await stream.write(b"")
        return stream  # the server ends it

    async with serving(events) as server, connect(server.port) as (reader, writer):
        writer.write(raw("GET", "/events"))
        head = parse_head(await reader.readuntil(END))
        assert head.headers["Transfer-Encoding"] == "chunked" and "Content-Length" not in head.headers
        for i, step in enumerate(steps):
            async with asyncio.timeout(2):
                assert await reader.readuntil(b"\n\n\r\n") == b"9\r\ndata: %d\n\n\r\n" % i
            step.set()
        assert await reader.readexactly(5) == b"0\r\n\r\n"
        writer.write(raw("GET", "/events"))  # the connection goes on
        assert (await read_answer(reader)).body == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"


async def test_a_stream_to_http10_is_close_delimited_and_to_head_has_no_body() -> None:
    async def words(request: Request) -> Stream:
        stream = await request.stream(201, "Made", [])
        for word in (b"one ", b"two"):
            await stream.write(word)
        await stream.end()
        await stream.end()
        return stream

    async with serving(words) as server:
        answer = await ask_closing(server.port, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert (answer.status, answer.body, answer.headers["Connection"]) == (201, b"one two", "close")
        assert "Transfer-Encoding" not in answer.headers
        async with connect(server.port) as (reader, writer):
            writer.write(raw("HEAD", "/") + raw("GET", "/"))
            assert (await read_answer(reader, "HEAD")).headers["Transfer-Encoding"] == "chunked"
            assert (await read_answer(reader)).body == b"one two"


async def test_a_client_that_does_not_read_makes_writes_wait() -> None:
    written, chunk, count = 0, 64 * 1024, 256

    async def flood(request: Request) -> Stream:
        nonlocal written
        stream = await request.stream(200, "", [])
        for i in range(count):
            await stream.write(bytes([i % 256]) * chunk)
            written += 1
        return stream

    async with serving(flood) as server, connect(server.port, rcvbuf=16384) as (reader, writer):
        writer.write(raw())
        await asyncio.sleep(0.5)
        (connection,) = server.connections
        assert written < count and connection.writing_paused  # 16 MB cannot all be buffered on the way
        answer = await read_answer(reader)
        assert written == count and len(answer.body) == count * chunk
        assert answer.body[::chunk] == bytes(i % 256 for i in range(count))


async def test_pipelined_requests_wait_while_the_client_does_not_read_the_answers() -> None:
    handled, count, size = 0, 40, 512 * 1024

    async def big(request: Request) -> Response:
        nonlocal handled
        handled += 1
        return Response(200, b"%c" % (48 + handled % 10) * size)

    async with serving(big) as server, connect(server.port, rcvbuf=16384) as (reader, writer):
        writer.write(raw() * count)
        await asyncio.sleep(0.5)
        assert handled < count  # 20 MB of answers are not made ahead of the client
        bodies = [(await read_answer(reader)).body for _ in range(count)]
    assert [b[0] - 48 for b in bodies] == [i % 10 for i in range(1, count + 1)] and handled == count


async def test_a_client_that_leaves_cancels_its_handler_and_stream_writes_fail() -> None:
    started, outcome = asyncio.Event(), asyncio.get_running_loop().create_future()

    async def waits(request: Request) -> Stream:
        stream = await request.stream(200, "", [])
        await stream.write(b"first")
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            try:
                await stream.write(b"more")
            except ConnectionResetError as exc:
                outcome.set_result(exc)
            raise
        return stream

    async with serving(waits) as server:
        async with connect(server.port) as (_, writer):
            writer.write(raw())
            await started.wait()
        async with asyncio.timeout(2):
            assert isinstance(await outcome, ConnectionResetError)


# --- crashes and the prepare hook --------------------------------------------------------------


@pytest.mark.parametrize("result", ["raise", "wrong type"])
async def test_a_crash_is_a_json_500_with_its_traceback_logged(caplog: pytest.LogCaptureFixture, result: str) -> None:
    async def crash(request: Request) -> Any:
        if result == "raise":
            raise RuntimeError("a bug with sk-secret")
        return {"not": "a response"}

    async with serving(crash) as server:
        answer = await ask_closing(server.port, raw())
    assert (answer.status, answer.error["code"], answer.error["type"]) == (500, "internal_error", "server_error")
    assert answer.error["message"] == "olla failed on this request; its log has the details"
    assert answer.headers["Via"] == wire.VIA and b"secret" not in answer.body
    (record,) = errors(caplog)
    assert record.name == "olla.server" and record.getMessage() == "handler failed"
    assert record.exc_info and isinstance(record.exc_info[1], RuntimeError if result == "raise" else TypeError)


async def test_a_crash_after_the_stream_head_cuts_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    async def breaks(request: Request) -> Stream:
        stream = await request.stream(200, "", [])
        await stream.write(b"partial")
        raise RuntimeError("mid-stream")

    async with serving(breaks) as server, connect(server.port) as (reader, writer):
        writer.write(raw())
        async with asyncio.timeout(2):
            data = await reader.read(-1)
    assert data.startswith(b"HTTP/1.1 200 OK") and data.endswith(b"7\r\npartial\r\n")  # no last chunk
    assert len(errors(caplog)) == 1


async def test_prepare_adds_headers_to_the_handlers_answers_only() -> None:
    shared = [("X-Shared", "1")]

    def prepare(request: Request, status: int, headers: list[tuple[str, str]]) -> None:
        headers.append(("X-Prepared", f"{request.state} {status}"))

    async def handler(request: Request) -> Response | Stream:
        request.state = "seen"
        if request.path == "/crash":
            raise RuntimeError("crash")
        if request.path == "/stream":
            return await request.stream(202, "", shared)
        return Response(200, b"", shared)

    async with serving(handler, prepare=prepare) as server:
        for path, status in (("/", 200), ("/", 200), ("/stream", 202)):
            answer = await ask(server.port, raw("GET", path))
            assert answer.headers.getall("X-Prepared") == [f"seen {status}"] and answer.headers["X-Shared"] == "1"
        for data in (raw("FROB"), raw("GET", "/crash")):
            answer = await ask(server.port, data)
            assert answer.status >= 400 and "X-Prepared" not in answer.headers
    assert shared == [("X-Shared", "1")]


# --- stop --------------------------------------------------------------------------------------


async def test_stop_closes_idle_connections_and_lets_requests_in_flight_finish() -> None:
    started = asyncio.Event()

    async def slow(request: Request) -> Response:
        started.set()
        await asyncio.sleep(0.4)
        return Response(200, b"finished")

    server = await Server.start(slow, "127.0.0.1", 0, shutdown_timeout=5.0)
    port = server.port
    async with connect(port) as (idle, _), connect(port) as (busy, writer):
        writer.write(raw() + raw())  # the second waits behind the first; it is never answered
        await started.wait()
        stopping = asyncio.create_task(server.stop())
        assert await closed_within(idle, 0.2) is not None
        with pytest.raises(OSError):
            async with connect(port):
                pass
        answer = await read_answer(busy)
        assert (answer.body, answer.headers["Connection"]) == (b"finished", "close")
        assert await closed_within(busy, 1) is not None
        async with asyncio.timeout(1):
            await stopping


async def test_stop_cancels_a_handler_past_the_shutdown_timeout() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def stuck(request: Request) -> Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    server = await Server.start(stuck, "127.0.0.1", 0, shutdown_timeout=0.3)
    async with connect(server.port) as (reader, writer):
        writer.write(raw())
        await started.wait()
        began = time.monotonic()
        await server.stop()
        assert cancelled.is_set() and 0.25 <= time.monotonic() - began < 2.0
        assert await closed_within(reader, 1) is not None


# --- real clients -----------------------------------------------------------------------------


async def test_aiohttp_keeps_one_connection_for_requests_and_streams() -> None:
    connections: set[Connection] = set()
    holder: list[Server] = []

    async def handler(request: Request) -> Response | Stream:
        connections.update(holder[0].connections)
        if request.path == "/stream":
            stream = await request.stream(200, "", [("Content-Type", "text/event-stream")])
            for i in range(3):
                await stream.write(b"data: %d\n\n" % i)
            return stream
        return await echo(request)

    async with serving(handler) as server, aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        holder.append(server)
        url = f"http://127.0.0.1:{server.port}"
        for i in range(3):
            async with session.post(f"{url}/p{i}", json={"i": i}) as response:
                assert response.status == 200 and (await response.json())["body"] == f'{{"i": {i}}}'
            async with session.post(f"{url}/z", data=b"squeeze " * 100, compress="deflate") as response:
                assert (await response.json())["body"] == "squeeze " * 100
            async with session.get(f"{url}/stream") as response:
                assert await response.read() == b"data: 0\n\ndata: 1\n\ndata: 2\n\n"
            async with session.head(f"{url}/h") as response:
                assert response.status == 200
    assert len(connections) == 1


async def test_the_openai_client_keeps_one_connection() -> None:
    openai = pytest.importorskip("openai")
    connections: set[Connection] = set()
    holder: list[Server] = []

    async def chat(request: Request) -> Response | Stream:
        connections.update(holder[0].connections)
        document = orjson.loads(await request.read(LIMIT, 5))
        if document.get("stream"):
            stream = await request.stream(200, "", [("Content-Type", "text/event-stream")])
            for word in ("Hel", "lo"):
                delta = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": document["model"],
                         "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}  # fmt: skip
                await stream.write(b"data: " + orjson.dumps(delta) + b"\n\n")
            await stream.write(b"data: [DONE]\n\n")
            return stream
        return Response(200, orjson.dumps({
            "id": "c", "object": "chat.completion", "created": 1, "model": document["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": document["messages"][0]["content"][::-1]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }), list(JSON))  # fmt: skip

    def talk(port: int) -> list[str]:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-test", max_retries=0) as client:
            said = []
            for text in ("abc", "def", "ghi"):
                reply = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}])
                said.append(reply.choices[0].message.content)
            chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                    stream=True)  # fmt: skip
            said.append("".join(c.choices[0].delta.content or "" for c in chunks))
            return said

    async with serving(chat) as server:
        holder.append(server)
        assert await asyncio.to_thread(talk, server.port) == ["cba", "fed", "ihg", "Hello"]
    assert len(connections) == 1


# --- any split of a request stream ---------------------------------------------------------------


class Transport(asyncio.Transport):
    """What a Connection writes, kept; nothing goes on the network."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


REQUEST = st.tuples(st.sampled_from(["GET", "POST", "PUT"]), st.from_regex(r"/[a-z0-9%]{0,12}", fullmatch=True),
                    st.binary(max_size=200), st.sampled_from(["length", "chunked"]), st.integers(1, 50))  # fmt: skip


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(requests=st.lists(REQUEST, min_size=1, max_size=5), cuts=st.lists(st.integers(0, 10_000), max_size=30))
def test_any_split_of_pipelined_requests_reaches_the_handler_the_same(
    requests: list[tuple[str, str, bytes, str, int]], cuts: list[int]
) -> None:
    data = b"".join(
        raw(method, path, body) if framing == "length" or method == "GET" and not body
        else raw(method, path, chunked(body, size), ["Transfer-Encoding: chunked"], length=False)
        for method, path, body, framing, size in requests
    )  # fmt: skip
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    seen: list[tuple[str, str, bytes]] = []

    async def record(request: Request) -> Response:
        body = await request.read(LIMIT, 5)
        seen.append((request.method, request.raw_path, body))
        return Response(200, body)

    async def feed() -> bytes:
        server = Server(record, None, 30.0, 1.0)
        connection, transport = Connection(server), Transport()
        connection.connection_made(transport)
        for a, b in itertools.pairwise(points):
            connection.data_received(data[a:b])
            for _ in range(5):
                await asyncio.sleep(0)
        while connection.task is not None and not connection.task.done():
            await asyncio.sleep(0)
        connection.connection_lost(None)
        return bytes(transport.written)

    written = asyncio.run(feed())
    assert seen == [(method, path, body) for method, path, body, _, _ in requests]
    assert written.count(b"HTTP/1.1 200 OK\r\n") == len(requests)


# --- the pure parts ------------------------------------------------------------------------------


def test_parse_head_reads_framing_and_keep_alive() -> None:
    head = wire.parse_head(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n"
                           b"Connection: Upgrade, Close\r\nExpect: 100-Continue")  # fmt: skip
    assert (head.length, head.chunked, head.keep_alive, head.expect_continue) == (5, False, False, True)
    head = wire.parse_head(b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:  Chunked ")
    assert (head.length, head.chunked, head.keep_alive) == (0, True, True)
    head = wire.parse_head(b"GET /x HTTP/1.0\r\nExpect: whatever")  # HTTP/1.0: no Host needed, Expect ignored
    assert (head.keep_alive, head.expect_continue) == (False, False)
    with pytest.raises(MalformedRequest):
        wire.parse_head(b"GET /x HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"9" * 40)


def test_chunked_decoding_keeps_what_follows() -> None:
    buffer = bytearray(b"5;name=value\r\nhello\r\n0\r\nTrailer: x\r\n\r\nGET / HTTP/1.1")
    chunks = Body(0, True)
    assert chunks.take(buffer) == b"hello" and chunks.done and buffer == b"GET / HTTP/1.1"


def test_a_decoder_makes_no_more_than_its_limit() -> None:
    bomb = gzip.compress(b"\0" * 50_000_000, 9)
    tracemalloc.start()
    try:
        with pytest.raises(RequestFailed) as caught:
            Decoder("gzip", LIMIT).feed(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert caught.value.status == 413 and peak < 3 * LIMIT


# --- under uvloop -----------------------------------------------------------------------------

UVLOOP = [
    test_one_connection_carries_request_after_request,
    test_pipelined_requests_are_answered_in_order_one_at_a_time,
    test_http10_closes_unless_asked_to_keep_alive,
    test_a_content_length_over_the_limit_is_refused_before_the_body_arrives,
    test_a_body_that_stops_arriving_gets_408_and_a_slow_one_does_not,
    test_100_continue_is_sent_when_the_body_is_first_read,
    test_an_unread_body_is_dropped_if_it_has_arrived_else_the_connection_closes,
    test_a_head_sent_slowly_is_cut_off_and_an_idle_connection_closed,
    test_stream_chunks_arrive_in_order_each_before_the_next_is_written,
    test_a_client_that_does_not_read_makes_writes_wait,
    test_pipelined_requests_wait_while_the_client_does_not_read_the_answers,
    test_a_client_that_leaves_cancels_its_handler_and_stream_writes_fail,
    test_stop_closes_idle_connections_and_lets_requests_in_flight_finish,
    test_stop_cancels_a_handler_past_the_shutdown_timeout,
    test_aiohttp_keeps_one_connection_for_requests_and_streams,
]


@pytest.mark.parametrize("scenario", UVLOOP, ids=lambda f: f.__name__.removeprefix("test_"))
def test_under_uvloop(scenario: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert isinstance(runner.get_loop(), uvloop.Loop)
        runner.run(scenario())  # type: ignore[arg-type]
