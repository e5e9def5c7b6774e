"""Raw HTTP/1.1 for tests of hostile input, and a router served the way `olla serve` serves it.

aiohttp's client normalises `..` and `//`, re-encodes paths and refuses malformed
headers, so these tests write the request bytes themselves and read the answer
until the router closes the connection (every request asks it to).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import orjson
from multidict import CIMultiDict

from olla.app import App, create_app
from olla.server import HEAD_TIMEOUT
from tests.routerkit import router_config, wait_until

HEADERS_END = b"\r\n\r\n"


@dataclass
class Answer:
    status: int  # 0: the connection closed without an answer
    headers: CIMultiDict[str]
    body: bytes

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def error(self) -> dict[str, str]:
        """The router's OpenAI-shaped error, checked for shape on the way."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), (self.status, self.body[:200])
        error = self.json()["error"]
        assert {"message", "type", "code"} <= set(error) and error["message"], error
        return error  # type: ignore[no-any-return]

    @property
    def from_endpoint(self) -> bool:
        """The endpoint answered (the router relayed it) rather than the router itself."""
        return "X-Olla-Endpoint" in self.headers


def request(
    method: str | bytes, target: str | bytes, body: bytes = b"", headers: Iterable[str | bytes] = (),
    content_length: bool | None = None,
) -> bytes:  # fmt: skip
    """One request's bytes; Host, Connection: close and (for a body or a POST) Content-Length added."""
    method = method.encode() if isinstance(method, str) else method
    target = target.encode() if isinstance(target, str) else target
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: olla.test", b"Connection: close"]
    lines += [h.encode() if isinstance(h, str) else h for h in headers]
    if content_length or (content_length is None and (body or method == b"POST")):
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + HEADERS_END + body


def parse(data: bytes) -> Answer:
    """The final answer in `data` (interim 1xx answers skipped)."""
    while True:
        head, sep, rest = data.partition(HEADERS_END)
        if not sep:
            return Answer(0, CIMultiDict(), data)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        if 100 <= status < 200:
            data = rest
            continue
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            return Answer(status, headers, _dechunk(rest))
        if "Content-Length" in headers:
            rest = rest[: int(headers["Content-Length"])]
        return Answer(status, headers, rest)


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


async def send(port: int, data: bytes, timeout: float = 10.0) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            return parse(await reader.read())
    finally:
        writer.close()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One answer with a Content-Length body, without waiting for the connection to close."""
    head = await reader.readuntil(HEADERS_END)
    answer = parse(head)
    answer.body = await reader.readexactly(int(answer.headers.get("Content-Length", "0")))
    return answer


def send_blocking(port: int, data: bytes, timeout: float = 10.0) -> Answer:
    """`send` for code that runs outside the event loop (a thread of its own)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return parse(b"".join(chunks))


@dataclass
class Served:
    app: App
    port: int


@asynccontextmanager
async def serving(
    endpoints: list[dict[str, Any]], ready: int | None = None, head_timeout: float = HEAD_TIMEOUT, **sections: Any
) -> AsyncIterator[Served]:
    """A router served as `olla serve` serves it, once `ready` (all) endpoints are routable."""
    app = create_app(router_config(endpoints, **sections))
    server = await app.serve("127.0.0.1", 0, shutdown_timeout=1.0, head_timeout=head_timeout)
    try:
        registry = app.registry
        want = len(endpoints) if ready is None else ready
        await wait_until(registry, lambda: sum(e.routable and e.discovery is not None for e in registry) >= want)
        yield Served(app, server.port)
    finally:
        await app.stop(server)
