"""The HTTP/1.1 client under upstream.py: framing, keep-alive, failures, TLS.

Framing is fed byte by byte, and in generated pieces (hypothesis), so any
split of a response across reads is covered; the rest runs against real
servers on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import subprocess
from dataclasses import astuple
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from olla.http1 import (
    HIGH_WATER,
    Client,
    Closed,
    Connection,
    Malformed,
    Origin,
    Response,
    parse_head,
    split,
)

ORIGIN = Origin("http", "127.0.0.1", 1, "127.0.0.1:1")


def _split_at(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(raw) + 1) for c in cuts} | {0, len(raw)})
    return [raw[a:b] for a, b in itertools.pairwise(points)]


def _read_in_parts(parts: list[bytes], method: str = "POST", close: bool = False) -> tuple[bytes, bool]:
    """Feed the parts as separate reads (then the close); (the body, whether the connection went back to the pool)."""
    client, connection = Client(4.0), Connection(ORIGIN)
    response: Response | None = None
    body = bytearray()
    for part in parts:
        connection.data_received(part)
        if response is None:
            head = parse_head(connection.buffer)
            if head is None:
                continue
            del connection.buffer[: head[4]]
            response = Response(client, connection, head[0], head[1], head[2], head[3], method, False)
        while piece := response.take():
            body += piece
    if close:
        connection.connection_lost(None)
    assert response is not None and response.take() == b""
    return bytes(body), client._reuse(ORIGIN) is connection



def fed(raw: bytes, method: str = "POST", close: bool = False) -> tuple[bytes, bool]:
    """A whole response fed one byte at a time."""
    return _read_in_parts([raw[i : i + 1] for i in range(len(raw))], method, close)

def _response(raw: bytes) -> tuple[Connection, Response]:
    client, connection = Client(4.0), Connection(ORIGIN)
    connection.data_received(raw)
    head = parse_head(connection.buffer)
    assert head is not None
    del connection.buffer[: head[4]]
    return connection, Response(client, connection, head[0], head[1], head[2], head[3], "POST", False)


def test_a_content_length_body_split_anywhere_arrives_whole_and_the_connection_is_kept() -> None:
    assert fed(b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-A: 1\r\n\r\nhello world") == (b"hello world", True)


def test_a_chunked_body_with_extensions_and_trailers_is_decoded() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
           b"6;ext=1\r\ndata: \r\n9\r\n{\"x\":1}\n\n\r\n2\r\n\r\n\r\n0\r\nX-Trailer: t\r\n\r\n")  # fmt: skip
    assert fed(raw) == (b'data: {"x":1}\n\n\r\n', True)


def test_a_body_framed_by_the_close_ends_with_it_and_the_connection_is_not_kept() -> None:
    assert fed(b"HTTP/1.0 200 OK\r\n\r\nuntil the end", close=True) == (b"until the end", False)


def test_connection_close_and_http_1_0_are_not_kept_alive() -> None:
    assert parse_head(bytearray(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n"))[3] is False  # type: ignore[index]
    assert parse_head(bytearray(b"HTTP/1.0 200 OK\r\n\r\n"))[3] is False  # type: ignore[index]
    assert parse_head(bytearray(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n"))[3] is True  # type: ignore[index]
    second = b"HTTP/1.1 200 OK\r\nConnection: x-trace\r\nconnection: Close\r\n\r\n"
    assert parse_head(bytearray(second))[3] is False  # type: ignore[index]  # any of its Connection headers


def test_the_header_lines_are_kept_as_sent_in_order() -> None:
    head = parse_head(bytearray(b"HTTP/1.1 200 OK\r\nB: 2\r\na: 1\r\nB:  3 \r\n\r\n"))
    assert head is not None and head[2] == [("B", "2"), ("a", "1"), ("B", "3")]


def test_no_body_after_204_or_head() -> None:
    assert fed(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n") == (b"", True)
    assert fed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", method="HEAD") == (b"", True)


@pytest.mark.parametrize("raw", [
    b"HTTP/2 200 OK\r\n\r\n",
    b"HTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n Folded: x\r\n\r\n",
])  # fmt: skip
def test_a_head_that_is_not_http_1_is_malformed(raw: bytes) -> None:
    with pytest.raises(Malformed):
        parse_head(bytearray(raw))


def test_an_endless_head_is_malformed() -> None:
    with pytest.raises(Malformed, match="larger than"):
        parse_head(bytearray(b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70_000))


@pytest.mark.parametrize("size", [b"0x10", b"-1", b"zz", b"+5", b""])
def test_a_bad_chunk_size_is_malformed(size: bytes) -> None:
    with pytest.raises(Malformed, match="chunk size"):
        fed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + size + b"\r\nabc\r\n0\r\n\r\n")


def test_conflicting_content_lengths_are_malformed() -> None:
    with pytest.raises(Malformed, match="Content-Length"):
        fed(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd")


def test_a_body_cut_short_by_the_close_raises_closed() -> None:
    connection, response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
    assert response.take() == b"abc"
    assert response.take() is None  # more must arrive
    connection.connection_lost(ConnectionResetError("reset by peer"))
    with pytest.raises(Closed, match="reset by peer"):
        response.take()


def test_urls_split_into_origin_and_target() -> None:
    origin, target = split("http://h:8080/a/b?x=1")
    assert astuple(origin) == ("http", "h", 8080, "h:8080") and target == "/a/b?x=1"
    assert astuple(split("https://h/")[0]) == ("https", "h", 443, "h") and split("https://h/")[1] == "/"
    assert split("http://h:8080/health")[0] is origin  # one object per origin: the idle pool matches by identity
    assert split("http://[::1]:9/v1")[0].host_header == "[::1]:9"
    with pytest.raises(ValueError, match="not an http"):
        split("ftp://h/")


# --- against real servers ------------------------------------------------------------------

async def _echo_server(aiohttp_server, **kwargs):  # type: ignore[no-untyped-def]
    async def echo(request: web.Request) -> web.Response:
        peer = request.transport.get_extra_info("peername")[1] if request.transport else 0
        body = await request.read()
        return web.json_response({"port": peer, "body": body.decode(), "host": request.host,
                                  "length": request.headers.get("Content-Length")})  # fmt: skip

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 65536)
        return response

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/big", big)
    return await aiohttp_server(app, **kwargs)


async def test_keep_alive_reuses_one_connection_and_fresh_opens_another(aiohttp_server) -> None:
    server = await _echo_server(aiohttp_server)
    client = Client(4.0)
    url = str(server.make_url("/echo"))
    ports, reuses = [], []
    for fresh in (False, False, True):
        response = await client.request("POST", url, {"Content-Type": "text/plain"}, b"hi", 1.0, fresh)
        ports.append(await response.read())
        reuses.append(response.reused)
    assert reuses == [False, True, False]
    first, second, third = (orjson.loads(p) for p in ports)
    assert first["port"] == second["port"] != third["port"]  # the same connection, then a new one
    assert first == {**first, "body": "hi", "length": "2", "host": f"127.0.0.1:{server.port}"}
    client.close()


async def test_a_request_that_said_close_never_leaves_its_connection_for_reuse() -> None:
    async def keeps_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):  # answers everything, and never says close itself
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        except asyncio.IncompleteReadError:
            writer.close()

    server = await asyncio.start_server(keeps_open, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    client = Client(4.0)
    for said_close, reuse_expected in ((False, False), (False, True), (True, True), (False, False)):
        response = await client.request("GET", url, {}, b"", 1.0, close=said_close)
        assert (response.reused, await response.read()) == (reuse_expected, b"ok")
    client.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.05)  # the handlers see the closes


async def test_an_idle_connection_that_received_bytes_is_not_reused() -> None:
    async def says_408_when_idle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")  # and no hang-up yet
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(says_408_when_idle, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    client = Client(4.0)
    response = await client.request("GET", url, {}, b"", 1.0)
    assert await response.read() == b"ok"
    await asyncio.sleep(0.2)
    response = await client.request("GET", url, {}, b"", 1.0)
    assert (response.reused, response.status, await response.read()) == (False, 200, b"ok")
    client.close()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.05)


async def test_an_interim_100_continue_is_skipped() -> None:
    async def continues(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(continues, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    response = await Client(4.0).request("POST", url, {"Expect": "100-continue"}, b"body", 1.0)
    assert (response.status, await response.read()) == (201, b"ok")
    server.close()
    await server.wait_closed()


async def test_an_idle_connection_past_keepalive_is_not_reused(aiohttp_server) -> None:
    server = await _echo_server(aiohttp_server)
    client = Client(0.05)
    url = str(server.make_url("/echo"))
    response = await client.request("GET", url, {}, b"", 1.0)
    await response.read()
    await asyncio.sleep(0.1)
    response = await client.request("GET", url, {}, b"", 1.0)
    assert response.reused is False
    client.close()


async def test_a_refused_connection_raises_an_os_error() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(OSError) as caught:
        await Client(4.0).request("GET", f"http://127.0.0.1:{port}/", {}, b"", 1.0)
    assert not isinstance(caught.value, Closed)


async def test_an_endpoint_that_closes_without_answering_raises_closed() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    with pytest.raises(Closed) as caught:
        await Client(4.0).request("GET", f"http://127.0.0.1:{port}/", {}, b"", 1.0)
    assert caught.value.reused is False
    server.close()


async def test_a_large_body_read_slowly_stops_reading_from_the_socket(aiohttp_server) -> None:
    server = await _echo_server(aiohttp_server)
    client = Client(4.0)
    response = await client.request("GET", str(server.make_url("/big")), {}, b"", 1.0)
    connection = response._connection
    assert connection is not None
    await asyncio.sleep(0.3)  # the server has written all 4 MiB it can; we read nothing
    assert len(connection.buffer) < HIGH_WATER + 2 * 65536 + 1024
    assert len(await response.read()) == 64 * 65536


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    return cert, key


async def test_https_endpoints_get_tls_with_certificate_checks(aiohttp_server, certificate) -> None:
    cert, key = certificate
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    served.load_cert_chain(cert, key)
    server = await _echo_server(aiohttp_server, ssl=served)
    url = f"https://127.0.0.1:{server.port}/echo"
    trusting = ssl.create_default_context(cafile=str(cert))
    client = Client(4.0, tls=trusting)
    response = await client.request("POST", url, {}, b"secret", 1.0)
    assert orjson.loads(await response.read())["body"] == "secret"
    client.close()
    with pytest.raises(ssl.SSLCertVerificationError):  # the default context does not trust a self-signed certificate
        await Client(4.0).request("POST", url, {}, b"secret", 1.0)


def test_whole_gives_a_body_that_has_all_arrived_and_takes_nothing_otherwise() -> None:
    _, response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    assert response.whole() == b"hello" and response.take() == b""
    connection, response = _response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhello")
    assert response.whole() is None and bytes(connection.buffer) == b"hello"
    _, response = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    assert response.whole() is None  # chunked replies stream
    _, response = _response(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert response.whole() == b""


def test_chunks_that_have_arrived_together_are_passed_on_as_one_piece() -> None:
    _, response = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            b"6\r\ndata: \r\n3\r\n1\n\n\r\n6\r\ndata: \r\n")  # fmt: skip
    assert response.take() == b"data: 1\n\ndata: "  # one write to the client, not three
    assert response.take() is None


def test_data_before_a_framing_fault_is_passed_on_before_the_fault() -> None:
    _, response = _response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
    assert response.take() == b"abc"
    for _ in range(2):
        with pytest.raises(Malformed, match="chunk size"):
            response.take()


@settings(max_examples=300, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(1, 300), max_size=12),
    extensions=st.lists(st.sampled_from([b"", b";x=1", b"; name=\"v\"", b"  "]), min_size=12, max_size=12),
    upper=st.booleans(),
    trailers=st.lists(st.sampled_from([b"X-T: 1", b"Server-Timing: a;dur=1"]), max_size=2),
    cuts=st.lists(st.integers(0, 10_000), max_size=20),
    seed=st.binary(min_size=1, max_size=64),
)
def test_any_chunked_body_split_anywhere_arrives_whole(sizes, extensions, upper, trailers, cuts, seed) -> None:  # type: ignore[no-untyped-def]
    data = (seed * (sum(sizes) // len(seed) + 1))[: sum(sizes)]
    raw, at = bytearray(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"), 0
    for size, extension in zip(sizes, extensions, strict=False):
        digits = b"%x" % size
        raw += (digits.upper() if upper else digits) + extension + b"\r\n" + data[at : at + size] + b"\r\n"
        at += size
    raw += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    assert _read_in_parts(_split_at(bytes(raw), cuts)) == (data, True)


@settings(max_examples=200, deadline=None, database=None)
@given(body=st.binary(max_size=2000), cuts=st.lists(st.integers(0, 10_000), max_size=20))
def test_any_content_length_body_split_anywhere_arrives_whole(body: bytes, cuts: list[int]) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    assert _read_in_parts(_split_at(raw, cuts)) == (body, True)


def test_expired_idle_connections_are_closed_when_another_is_released() -> None:
    client = Client(4.0)
    old, recent, new = Connection(ORIGIN), Connection(ORIGIN), Connection(ORIGIN)
    client.release(old)
    client.release(recent)
    old.idle_since -= 5.0  # idle longer than keepalive
    client.release(new)
    assert old.closed and not recent.closed and not new.closed
    assert client._reuse(ORIGIN) is new and client._reuse(ORIGIN) is recent and client._reuse(ORIGIN) is None
