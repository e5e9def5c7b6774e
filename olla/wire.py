"""HTTP/1.1 as bytes, under olla.server: a request's head, and response heads (a body's framing: olla.body).

Pure: no I/O, no asyncio. What a client sends that breaks HTTP/1.1 raises an
olla.errors exception whose message never repeats the client's bytes (a header
may hold a secret). Limits on a head (aiohttp's defaults, which olla served with
before it had its own server):

    request line              MAX_LINE_SIZE bytes     431 header_too_large
    one header line           MAX_FIELD_SIZE bytes    431 header_too_large
    headers in one request    MAX_HEADERS             400 malformed_request

`HeadScan` checks the first two as a head arrives, so a head that breaks them is
refused before its end; `parse_head` checks the rest once it is whole.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus
from typing import NamedTuple
from urllib.parse import unquote

import orjson
from multidict import CIMultiDict

from olla import __version__
from olla.errors import (
    ExpectationFailed,
    HeadTooLarge,
    MalformedRequest,
    RequestFailed,
)

MAX_LINE_SIZE = 8190
MAX_FIELD_SIZE = 8190
MAX_HEADERS = 128
VIA = f"1.1 olla/{__version__}"  # on every answer olla makes itself

METHODS = frozenset(("GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"))
VERSIONS = frozenset(("HTTP/1.1", "HTTP/1.0"))
TOKEN = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"  # RFC 9110 tchar
TLS = b"\x16\x03"  # a TLS handshake record
_CONTROLS = bytes(range(0x20)) + b"\x7f"
_NOT_CONTROLS = bytes(sorted(set(range(256)) - set(_CONTROLS)))  # translate(None, this) leaves the controls only
_CRLFS = b"\r\n" * MAX_HEADERS
_NAMES: set[str] = set()  # header names found to be tokens (the first thousand): most requests repeat a few


def malformed(reason: str) -> MalformedRequest:
    return MalformedRequest(f"malformed HTTP request: {reason}")


def _too_large() -> HeadTooLarge:
    return HeadTooLarge(f"the request line or a header is longer than {MAX_FIELD_SIZE} bytes")


class HeadScan:
    """Where the head at a buffer's start ends, its line limits checked as its bytes arrive."""

    __slots__ = ("_checked", "_lines")

    def __init__(self) -> None:
        self._checked = 0  # where the first line not checked yet starts
        self._lines = 0  # lines checked (the request line and headers)

    def end(self, buffer: bytes | bytearray) -> int:
        """The offset of the blank line that ends the head, or -1 while it has not arrived.

        The buffer holds what has arrived, from the head's first byte (leading empty lines dropped).
        """
        end = buffer.find(b"\r\n\r\n", self._checked - 2 if self._checked > 2 else 0)
        if end >= 0:
            self._checked = self._lines = 0
            return end
        if buffer.startswith(TLS):
            raise malformed("TLS sent to a plain HTTP port")
        checked, lines = self._checked, self._lines
        while (newline := buffer.find(b"\n", checked)) >= 0:
            if newline == checked or buffer[newline - 1] != 13:
                raise malformed("a line of the head does not end in CRLF")
            if newline - 1 - checked > (MAX_LINE_SIZE if lines == 0 else MAX_FIELD_SIZE):
                raise _too_large()
            lines += 1
            if lines > MAX_HEADERS + 1:
                raise malformed("too many headers")
            checked = newline + 1
        if len(buffer) - checked > MAX_FIELD_SIZE + 1:  # + 1: a line's CR may have come without its LF
            raise _too_large()
        self._checked, self._lines = checked, lines
        return -1


# Headers that say one thing once (RFC 9110); two could be read differently by olla and an endpoint.
SINGLETONS = frozenset(("content-location", "content-range", "content-type", "etag", "max-forwards", "user-agent",
                        "transfer-encoding", "content-encoding"))  # fmt: skip


class Head(NamedTuple):
    """A request's head, checked; its body's framing and what the connection does after it."""

    method: str
    target: str  # as sent
    raw_path: str  # the target's path, percent-escapes kept ("*" for OPTIONS *)
    path: str  # raw_path percent-decoded
    query_string: str  # after "?", as sent
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: CIMultiDict[str]  # values decoded UTF-8 (bytes that are not: kept as surrogates), trimmed
    length: int  # the body's Content-Length; 0 when chunked or none
    chunked: bool
    keep_alive: bool  # by the version and the Connection header
    expect_continue: bool  # Expect: 100-continue (HTTP/1.1)


def parse_head(data: bytes | bytearray) -> Head:
    """The head in `data`: the request line and the header lines, without the blank line that ends them."""
    text = data.decode("utf-8", "surrogateescape")  # as olla's client decodes an endpoint's: bytes pass through
    lines = text.split("\r\n")
    if len(lines) > MAX_HEADERS + 1:
        raise malformed("too many headers")
    method, target, version = _request_line(lines[0], data)
    raw_path, query = _target(method, target)
    controls = data.translate(None, _NOT_CONTROLS)
    crlfs = _CRLFS[: 2 * (len(lines) - 1)]
    if controls != crlfs and controls.replace(b"\t", b"") != crlfs:
        bare = any("\n" in line or "\r" in line for line in lines)
        raise malformed("a line of the head does not end in CRLF" if bare else "invalid header")
    if len(data) > MAX_FIELD_SIZE and any(len(line) > MAX_FIELD_SIZE for line in lines):
        raise _too_large()
    pairs = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or name not in _NAMES:
            if not colon or not name or name.strip(TOKEN):
                raise malformed("obsolete line folding" if line[:1] in (" ", "\t") else "invalid header")
            if len(_NAMES) < 1000:
                _NAMES.add(name)
        pairs.append((name, value.strip(" \t")))
    headers: CIMultiDict[str] = CIMultiDict(pairs)
    eleven = version == "HTTP/1.1"
    if eleven and len(headers.getall("Host", ())) != 1:
        raise malformed("an HTTP/1.1 request needs exactly one Host header")
    names = {name.lower() for name, _ in pairs}
    if len(names) < len(pairs):
        for name in sorted(names & SINGLETONS):
            if len(headers.getall(name)) > 1:
                raise malformed(f"the {name} header appears more than once")
    length, chunked = _framing(headers, eleven)
    connection = headers.getall("Connection", None)
    if connection is None:
        keep_alive = eleven
    else:
        value = ",".join(connection).lower()
        tokens = [token.strip() for token in value.split(",")] if "," in value else [value]
        keep_alive = "close" not in tokens if eleven else "keep-alive" in tokens
    expect = headers.get("Expect") if eleven else None
    if expect is not None and expect.lower() != "100-continue":
        raise ExpectationFailed("the only expectation olla meets is Expect: 100-continue")
    path = unquote(raw_path) if "%" in raw_path else raw_path
    return Head(method, target, raw_path, path, query, version, headers, length, chunked, keep_alive,
                expect is not None)  # fmt: skip


def _request_line(line: str, data: bytes | bytearray) -> tuple[str, str, str]:
    if data.startswith(TLS):
        raise malformed("TLS sent to a plain HTTP port")
    if len(line) > MAX_LINE_SIZE:
        raise _too_large()
    method, _, rest = line.partition(" ")
    target, _, version = rest.partition(" ")
    if method not in METHODS:
        raise malformed("HTTP/2 is not served here, only HTTP/1.1" if line == "PRI * HTTP/2.0" else "unknown method")
    if version not in VERSIONS:
        raise malformed("invalid request line or HTTP version")
    if not target or not target.isascii() or not target.isprintable():  # printable ASCII without space: 0x21-0x7E
        raise malformed("invalid request target")
    return method, target, version


def _target(method: str, target: str) -> tuple[str, str]:
    """The target's path and query: origin-form, absolute-form (http[s]://authority/path) or `*` for OPTIONS."""
    if target[0] != "/":
        if target == "*" and method == "OPTIONS":
            return target, ""
        scheme = target[:8].lower()
        start = 7 if scheme.startswith("http://") else 8 if scheme == "https://" else 0
        ends = [i for i in (target.find("/", start), target.find("?", start)) if i >= 0]
        authority_end = min(ends) if ends else len(target)
        if not start or authority_end == start:
            raise malformed("invalid request target")
        target = target[authority_end:]
        if not target.startswith("/"):
            target = "/" + target
    raw_path, _, query = target.partition("?")
    return raw_path, query


def _framing(headers: CIMultiDict[str], eleven: bool) -> tuple[int, bool]:
    """(Content-Length, chunked) from the headers."""
    lengths = headers.getall("Content-Length", None)
    coding = headers.getall("Transfer-Encoding", None)
    if coding is not None:
        if lengths is not None:
            raise malformed("both Content-Length and Transfer-Encoding")
        if not eleven:
            raise malformed("Transfer-Encoding in an HTTP/1.0 request")
        if ",".join(coding).strip().lower() != "chunked":
            raise malformed("the only Transfer-Encoding olla reads is chunked")
        return 0, True
    if lengths is None:
        return 0, False
    length = lengths[0]
    if not length.isascii() or not length.isdigit() or len(length) > 18 or lengths.count(length) != len(lengths):
        raise malformed("invalid Content-Length")
    return int(length), False


_STATUS_LINES = {status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n" for status in HTTPStatus}
_date_second = 0
_date_line = ""


def _date() -> str:
    """The Date header line, made once a second."""
    global _date_second, _date_line
    now = int(time.time())
    if now != _date_second:
        _date_second, _date_line = now, f"Date: {formatdate(now, usegmt=True)}\r\n"
    return _date_line


def response_head(status: int, reason: str, headers: list[tuple[str, str]], framing: str) -> bytes:
    """A response head: the status line (reason "": the standard one), the headers, Date unless they have one, then
    the server's `framing` lines (Content-Length or Transfer-Encoding, Connection), each ending in CRLF."""
    line = _STATUS_LINES.get(status) if not reason else None
    lines = [line or f"HTTP/1.1 {status} {reason or 'Unknown'}\r\n"]
    dated = False
    for name, value in headers:
        if len(name) == 4 and name.lower() == "date":
            dated = True
        lines.append(f"{name}: {value}\r\n")
    if not dated:
        lines.append(_date())
    lines.append(framing)
    lines.append("\r\n")
    return "".join(lines).encode("utf-8", "surrogateescape")  # as olla.http1 decodes an endpoint's headers


def answer(failure: RequestFailed) -> bytes:
    """The server's own answer (a refusal, a 500) in OpenAI's shape, with `Connection: close`."""
    body = orjson.dumps(failure.body())
    headers = [("Content-Type", "application/json"), ("Via", VIA)]
    return response_head(failure.status, "", headers, f"Content-Length: {len(body)}\r\nConnection: close\r\n") + body
