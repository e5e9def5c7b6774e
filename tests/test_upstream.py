"""Connection handling against an endpoint that closes connections the way llama-server does.

llama-server closes a connection after a chunked (streamed) reply, and closes
idle keep-alive connections after 5 s. A raw-socket endpoint plays the worst
case deterministically: a request that arrives on such a connection is dropped
without an answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from olla import http1
from olla.app import create_app
from olla.config import EndpointConfig
from olla.endpoint import Endpoint
from olla.upstream import request_headers, response_headers
from tests.routerkit import RouterServer, router_config, wait_until

MODELS = orjson.dumps({"object": "list", "data": [{"id": "m"}]})


@dataclass
class StingyEndpoint:
    """HTTP/1.1 over raw sockets; drops any request sent on a connection after a chunked reply,
    and any second request on a connection when `one_request_per_connection` is set."""

    one_request_per_connection: bool = False
    pause_mid_body: float = 0.0  # a plain reply's body stops halfway this long
    garbled: bool = False  # /tokenize answers with no HTTP status line; a stream's second chunk has no size
    connections_with_work: int = 0
    dropped: int = 0
    server: asyncio.Server | None = field(default=None, repr=False)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        streamed = served = 0
        counted = False
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line, *header_lines = head.decode().split("\r\n")
                method, path, _ = line.split(" ")
                headers = dict(h.split(": ", 1) for h in header_lines if h)
                await reader.readexactly(int(headers.get("Content-Length", "0")))
                if method == "POST" and (streamed or (self.one_request_per_connection and served)):
                    self.dropped += 1
                    return  # the request never reaches the model
                if method == "POST" and not counted:
                    counted = True
                    self.connections_with_work += 1
                served += method == "POST"
                closing = headers.get("Connection", "").lower() == "close"  # honoured, as cpp-httplib does
                if path == "/completion":
                    streamed += 1
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                                 + (b"Connection: close\r\n\r\n" if closing else b"Keep-Alive: timeout=5, max=100\r\n\r\n"))  # fmt: skip
                    for event in (b'data: {"content":"a","stop":false}\n\n', b'data: {"content":"","stop":true}\n\n'):
                        writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                        await writer.drain()
                        if self.garbled:
                            writer.write(b"zz\r\n")
                            return
                    writer.write(b"0\r\n\r\n")
                elif path == "/tokenize" and self.garbled:
                    writer.write(b"SPDY/3 200 OK\r\n\r\n")
                    return
                else:
                    body = MODELS if path == "/v1/models" else b'{"status":"ok"}'
                    if path == "/tokenize":
                        body = orjson.dumps({"tokens": list(range(2000))})
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
                    half = len(body) // 2 if path == "/tokenize" and self.pause_mid_body else len(body)
                    writer.write(body[:half])
                    await writer.drain()
                    await asyncio.sleep(self.pause_mid_body if half < len(body) else 0)
                    writer.write(body[half:])
                await writer.drain()
                if closing:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


@pytest.fixture
async def stingy() -> AsyncIterator[StingyEndpoint]:
    endpoint = StingyEndpoint()
    yield endpoint
    await endpoint.stop()


async def _router(aiohttp_client, url: str, **sections):  # type: ignore[no-untyped-def]
    client = await aiohttp_client(RouterServer(create_app(router_config([{"name": "e", "url": url}], **sections))))
    registry = client.app.registry
    await wait_until(registry, lambda: registry.endpoints["e"].routable and registry.endpoints["e"].discovery)
    return client, registry.endpoints["e"]


async def test_a_connection_is_never_reused_after_a_streamed_reply(aiohttp_client, stingy) -> None:
    client, endpoint = await _router(aiohttp_client, await stingy.start())
    for _ in range(10):
        r = await client.post("/olla/llamacpp/completion", json={"prompt": "x", "stream": True})
        assert r.status == 200 and (await r.text()).count("data: ") == 2
    assert stingy.dropped == 0
    assert stingy.connections_with_work == 10
    assert endpoint.errors == 0 and endpoint.routable


async def test_a_pooled_connection_the_endpoint_closed_is_retried_on_a_fresh_one(aiohttp_client, stingy) -> None:
    stingy.one_request_per_connection = True
    client, endpoint = await _router(aiohttp_client, await stingy.start())
    for _ in range(6):
        r = await client.post("/olla/llamacpp/tokenize", json={"content": "x"})
        assert r.status == 200, await r.text()
        assert r.headers["X-Olla-Routing-Decision"] == "routed"
    assert stingy.dropped >= 1, "the test endpoint never dropped a reused connection"
    assert endpoint.errors == 0 and endpoint.routable


async def test_a_body_that_pauses_midway_arrives_whole(aiohttp_client, stingy) -> None:
    stingy.pause_mid_body = 0.2
    client, endpoint = await _router(aiohttp_client, await stingy.start(), proxy={"read_timeout": "2s"})
    r = await client.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert r.status == 200
    assert (await r.json())["tokens"] == list(range(2000))
    assert endpoint.errors == 0


async def test_a_body_silent_midway_past_read_timeout_is_cut(aiohttp_client, stingy) -> None:
    stingy.pause_mid_body = 3.0
    client, endpoint = await _router(aiohttp_client, await stingy.start(), proxy={"read_timeout": "300ms"})
    r = await client.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert r.status == 200  # headers went out before the silence
    with pytest.raises(aiohttp.ClientPayloadError):
        await r.read()
    assert endpoint.errors == 1


async def test_an_answer_that_is_not_http_fails_the_attempt_with_a_clear_reason(aiohttp_client, stingy) -> None:
    client, endpoint = await _router(aiohttp_client, await stingy.start())
    stingy.garbled = True
    r = await client.post("/olla/llamacpp/tokenize", json={"content": "x"})
    assert r.status == 503  # the breaker took the only endpoint out: no healthy endpoint, and why
    error = (await r.json())["error"]
    assert error["code"] == "no_healthy_endpoint"
    assert error["message"].endswith("every attempt failed: endpoint e failed before answering: "
                                     "not an HTTP/1.x status line: 'SPDY/3 200 OK'")  # fmt: skip
    assert endpoint.errors == 1


async def test_a_stream_with_broken_chunk_framing_ends_with_an_error_event(aiohttp_client, stingy) -> None:
    client, endpoint = await _router(aiohttp_client, await stingy.start())
    stingy.garbled = True
    r = await client.post("/olla/llamacpp/completion", json={"prompt": "x", "stream": True})
    assert r.status == 200
    events = [e for e in (await r.text()).split("\n\n") if e]
    assert events[0] == 'data: {"content":"a","stop":false}'
    error = orjson.loads(events[-1].removeprefix("data: "))["error"]
    assert error["message"] == "endpoint e broke the response off: invalid chunk size line"
    assert endpoint.errors == 1


def test_an_answer_keeps_its_headers_but_not_its_framing_nor_what_its_connection_header_names() -> None:
    def relayed(raw: bytes) -> list[tuple[str, str]]:
        head = http1.parse_head(bytearray(raw))
        assert head is not None
        return response_headers(http1.Response(http1.Client(4.0), http1.Connection(http1.split("http://e/")[0]), head[0], head[1],
                                               head[2], head[3], "GET", False))  # fmt: skip

    assert relayed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nServer: s\r\nX-Olla-Endpoint: spoof\r\n"
                   b"Access-Control-Allow-Origin: *\r\nConnection: keep-alive\r\nX-Trace: t\r\n\r\n") == [
        ("Server", "s"), ("X-Trace", "t")]  # fmt: skip
    assert relayed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close, X-Trace\r\nX-Trace: t\r\n"
                   b"x-kept: k\r\n\r\n") == [("x-kept", "k")]  # fmt: skip


def test_a_request_keeps_its_headers_but_not_hop_by_hop_ones_credentials_or_what_the_endpoint_sets() -> None:
    endpoint = Endpoint(EndpointConfig(name="e", url="http://e:8080", headers={"x-team": "own"}))
    incoming = CIMultiDictProxy(CIMultiDict([
        ("Host", "olla"), ("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"), ("Authorization", "Bearer c"),
        ("TE", "trailers"), ("X-Forwarded-For", "10.0.0.1"), ("X-Custom", "kept"), ("X-Team", "client's"), ("Content-Type", "text/plain"),
    ]))  # fmt: skip
    assert request_headers(incoming, endpoint, "127.0.0.1", "http") == [
        ("X-Custom", "kept"), ("Content-Type", "text/plain"), ("X-Forwarded-For", "10.0.0.1, 127.0.0.1"),
        ("X-Forwarded-Proto", "http"), ("x-team", "own")]  # fmt: skip
