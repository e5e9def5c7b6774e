"""The floor under olla: what a proxy with no logic at all costs in aiohttp, and in plain asyncio.

Four reference proxies forward the non-streaming chat to the same nginx upstream:

- `aiohttp`: a `web.Application` with one handler and one `ClientSession` on uvloop: aiohttp's server
  and client, with nothing of olla's (no routing, headers, metrics or log);
- `aiohttp-server+olla-client`: aiohttp's low-level `web.Server` (no application, router or
  middleware) forwarding with olla's own client (olla/http1.py): the least any use of aiohttp's
  server costs (olla was built on aiohttp's application server until it got its own);
- `olla-server+olla-client`: olla's own server (olla/server.py) with one handler forwarding with
  olla's client: the HTTP stack olla is built on, with nothing of olla's routing;
- `asyncio`: HTTP/1.1 with keep-alive on both sides, written on asyncio protocols (uvloop), for
  Content-Length bodies only: what Python itself costs per proxied request.

They run interleaved with the nginx proxy and olla (A B C D E, several rounds, medians). Neither is
a product; they tell how much of olla's cost is its HTTP stack and how much is olla.

    python -m bench.overhead.floors PROXY UPSTREAM_PORT PORT   (one of PROXIES, until killed)
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from aiohttp import web
from aiohttp.typedefs import Handler

from bench.common import process, usage, wait_http
from bench.overhead.wrk import Run, wrk
from olla import messages, server
from olla.http1 import Client
from tests.llamacpp import free_port

PROXIES = ("aiohttp", "aiohttp-server+olla-client", "olla-server+olla-client", "asyncio")
TARGETS = ("direct", "nginx", "olla", *PROXIES)
PREFIX = b"/olla/llamacpp"  # the proxies take olla's path, so wrk posts the same URL path to all


def serve_aiohttp(upstream: int, port: int) -> None:
    base = f"http://127.0.0.1:{upstream}"

    async def forward(request: web.Request) -> web.Response:
        path, headers, body = await _incoming(request)
        async with request.app[SESSION].request(request.method, base + path, data=body, headers=headers) as answer:
            return web.Response(body=await answer.read(), status=answer.status, content_type=answer.content_type)

    async def session(app: web.Application) -> AsyncIterator[None]:
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    _run(forward, session, port)


def serve_aiohttp_server_olla_client(upstream: int, port: int) -> None:
    """aiohttp's low-level server (`web.Server`: one handler, no application) forwarding with olla's client."""
    base = f"http://127.0.0.1:{upstream}"

    async def main() -> None:
        client = Client(4.0)

        async def forward(request: web.BaseRequest) -> web.Response:
            return await relay(client, base, request)

        server = await asyncio.get_running_loop().create_server(web.Server(forward, access_log=None), "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


async def relay(client: Client, base: str, request: web.BaseRequest) -> web.Response:
    """Forward a request under olla's path to `base` with olla's client; the answer's body and content type."""
    path, headers, body = await _incoming(request)
    answer = await client.request(request.method, base + path, headers, body, 5.0)
    content = await answer.read()
    return web.Response(body=content, status=answer.status, headers={"Content-Type": answer.headers["Content-Type"]})


async def forward(client: Client, base: str, request: messages.Request) -> messages.Response:
    """`relay` on olla's own server."""
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    body = await request.read(1 << 20, 30.0)
    answer = await client.request(request.method, base + request.path.removeprefix(PREFIX.decode()), headers, body,
                                  5.0)  # fmt: skip
    content = await answer.read()
    return messages.Response(answer.status, content, [("Content-Type", answer.headers["Content-Type"])])


async def _incoming(request: web.BaseRequest) -> tuple[str, dict[str, str], bytes]:
    """What the aiohttp proxies forward: the path without olla's prefix, the content type, the body."""
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    return request.path.removeprefix(PREFIX.decode()), headers, await request.read()


def _run(forward: Handler, context: Callable[[web.Application], AsyncIterator[None]], port: int) -> None:
    app = web.Application()
    app.cleanup_ctx.append(context)
    app.router.add_route("*", "/{tail:.*}", forward)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


SESSION = web.AppKey("session", aiohttp.ClientSession)


def _message(buffer: bytearray) -> tuple[bytes, bytes, bool] | None:
    """(head, body, keep-alive) of the first complete Content-Length message in `buffer`, removed from it."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    raw = bytes(buffer[:end])
    head = raw.lower()
    at = head.find(b"content-length:")
    length = int(head[at + 15 :].split(b"\r\n", 1)[0]) if at >= 0 else 0
    if len(buffer) < end + 4 + length:
        return None
    body = bytes(buffer[end + 4 : end + 4 + length])
    del buffer[: end + 4 + length]
    return raw, body, b"connection: close" not in head


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self.buffer = bytearray()
        self.answer: asyncio.Future[tuple[bytes, bytes, bool]] | None = None
        self.transport: asyncio.Transport | None = None
        self.open = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        message = _message(self.buffer)
        if message is not None and self.answer is not None and not self.answer.done():
            self.answer.set_result(message)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("upstream closed"))


class _Client(asyncio.Protocol):
    def __init__(self, upstream: int, pool: list[_Upstream]) -> None:
        self.upstream, self.pool = upstream, pool
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.busy:
            self._next()

    def _next(self) -> None:
        message = _message(self.buffer)
        if message is not None:
            self.busy = True
            asyncio.ensure_future(self._forward(*message))

    async def _forward(self, head: bytes, body: bytes, keep_alive: bool) -> None:
        method, target, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        request = b"%s %s HTTP/1.1\r\nHost: upstream\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            method, target.removeprefix(PREFIX), len(body), body)  # fmt: skip
        answer_head, answer_body, _ = await self._ask(request)
        status = answer_head.split(b" ", 2)[1]
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %s \r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
            status, len(answer_body), answer_body))  # fmt: skip
        if not keep_alive:
            self.transport.close()
            return
        self.busy = False
        self._next()

    async def _ask(self, request: bytes) -> tuple[bytes, bytes, bool]:
        loop = asyncio.get_running_loop()
        while self.pool:
            connection = self.pool.pop()
            if connection.open:
                break
        else:
            _, connection = await loop.create_connection(_Upstream, "127.0.0.1", self.upstream)
        connection.answer = loop.create_future()
        assert connection.transport is not None
        connection.transport.write(request)
        answer = await connection.answer
        if answer[2] and connection.open:
            self.pool.append(connection)
        elif connection.transport is not None:
            connection.transport.close()
        return answer


def serve_olla_server_olla_client(upstream: int, port: int) -> None:
    """olla's own server with one handler forwarding with olla's client."""
    base = f"http://127.0.0.1:{upstream}"

    async def main() -> None:
        client = Client(4.0)

        async def handle(request: messages.Request) -> messages.Response:
            return await forward(client, base, request)

        await server.Server.start(handle, "127.0.0.1", port)
        await asyncio.Event().wait()

    uvloop.run(main())


def serve_asyncio(upstream: int, port: int) -> None:
    async def main() -> None:
        pool: list[_Upstream] = []
        server = await asyncio.get_running_loop().create_server(lambda: _Client(upstream, pool), "127.0.0.1", port)
        await server.serve_forever()

    uvloop.run(main())


@contextmanager
def proxies(upstream: int) -> Iterator[tuple[dict[str, str], dict[str, int]]]:
    """The reference proxies in front of `upstream`; yields their chat URLs and pids."""
    with ExitStack() as stack:
        urls, pids = {}, {}
        for name in PROXIES:
            port = free_port()
            proc = stack.enter_context(process([sys.executable, "-m", "bench.overhead.floors", name, str(upstream), str(port)]))
            urls[name], pids[name] = f"http://127.0.0.1:{port}/olla/llamacpp/v1/chat/completions", proc.pid
        for url in urls.values():
            asyncio.run(wait_http(url.replace("/v1/chat/completions", "/health")))
        yield urls, pids


@dataclass
class Floors:
    runs: dict[tuple[str, int], list[Run]] = field(default_factory=dict)
    cpu_per_1k: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def median(self, target: str, conns: int, what: str) -> float:
        return statistics.median(getattr(r, what) for r in self.runs[(target, conns)])


def measure(urls: dict[str, str], pids: dict[str, int], body: dict, rounds: int, seconds: float,
            connections: list[int]) -> Floors:  # fmt: skip
    result = Floors()
    for url in urls.values():
        wrk(url, body, 4, 1)
    for round_ in range(rounds):
        for conns in connections:
            for target in TARGETS:
                before = usage(pids[target]).cpu if target in pids else 0.0
                run = wrk(urls[target], body, conns, seconds)
                result.runs.setdefault((target, conns), []).append(run)
                if target in pids:
                    spent = (usage(pids[target]).cpu - before) / max(run.requests, 1) * 1000
                    result.cpu_per_1k.setdefault((target, conns), []).append(spent)
                print(f"floors round {round_ + 1} c={conns:<3} {target:8} {run.rate:8.0f} req/s "
                      f"p50 {run.p50_ms:6.2f} ms errors {run.errors}", flush=True)  # fmt: skip
    return result


def table(result: Floors, connections: list[int]) -> list[str]:
    rows = ["| conns | proxy | req/s | / nginx proxy | p50 ms | added p50 over direct ms | CPU s per 1k req | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for conns in connections:
        nginx, direct = result.median("nginx", conns, "rate"), result.median("direct", conns, "p50_ms")
        for target in TARGETS[1:]:
            rate, p50 = result.median(target, conns, "rate"), result.median(target, conns, "p50_ms")
            cpu = statistics.median(result.cpu_per_1k[(target, conns)])
            errors = sum(r.errors for r in result.runs[(target, conns)])
            rows.append(f"| {conns} | {target} | {rate:.0f} | {rate / nginx:.2f} | {p50:.2f} "
                        f"| {p50 - direct:+.2f} | {cpu:.3f} | {errors} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    kind, upstream_port, own_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    serve = {"aiohttp": serve_aiohttp, "aiohttp-server+olla-client": serve_aiohttp_server_olla_client,
             "olla-server+olla-client": serve_olla_server_olla_client, "asyncio": serve_asyncio}  # fmt: skip
    serve[kind](upstream_port, own_port)


def run(rounds: int, seconds: float, connections: list[int], log: Path) -> Floors:
    """nginx's proxy, olla and the reference proxies in front of one nginx upstream, interleaved."""
    from bench.overhead.throughput import WORKLOADS, targets

    with targets(log) as (urls, pids), proxies(int(urls["chat"]["direct"].split(":")[2].split("/")[0])) as more:
        chat = {**urls["chat"], **more[0]}
        return measure(chat, {**pids, **more[1]}, WORKLOADS["chat"], rounds, seconds, connections)
