"""Every HTTP call to an endpoint; the one place the client's exceptions (olla.http1) become olla.errors.

Timeouts follow llama-server's behaviour: it sends no headers until a
non-streaming generation has finished (or while a request waits for a slot),
so waiting for headers is bounded only by the request's total deadline
(`response_timeout`); `read_timeout` bounds the silence between body chunks.

Connections: llama-server keeps a connection alive after a plain response but
closes it after a chunked (streamed) one, and drops idle ones after 5 seconds.
So a request that asks to stream is sent with `Connection: close`; pooled
connections idle at most KEEPALIVE seconds; and a request that meets a
pooled connection the endpoint already closed is sent again once on a fresh
one (it never reached the endpoint). That failure comes at once; a connection
dropped later (the endpoint crashed, or something in front of it gave up)
dropped a request the endpoint had, and sending it there again could run it
twice or wait out the deadline: that attempt fails, and the proxy fails over.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import orjson

from olla.config import ProxyConfig
from olla.endpoint import Endpoint, Health, Probe
from olla.errors import (
    UpstreamBroken,
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from olla.http1 import Client, Closed, ConnectTimeout, Response

HOP_BY_HOP = frozenset(
    ("connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
     "te", "trailer", "transfer-encoding", "upgrade")
)  # fmt: skip
# Client credentials are for olla, never for an endpoint; X-Conversation-Id makes
# llama-server keep generating after the client leaves, holding the slot.
FRAMING = HOP_BY_HOP | {"content-length"}
# olla's server decoded the body (Content-Encoding) and olla sets X-Forwarded-*.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "authorization", "x-api-key", "cookie", "x-conversation-id",
                              "content-encoding", "x-forwarded-for", "x-forwarded-proto"}  # fmt: skip
Headers = list[tuple[str, str]]
REJECTED = frozenset((502, 503, 504))
REJECTED_BODY_LIMIT = 64 * 1024
KEEPALIVE = 4.0  # below llama-server's 5 s keep-alive timeout
STALE = 0.25  # a pooled connection the endpoint had closed fails within this long of sending on it


def request_headers(incoming: Mapping[str, str], endpoint: Endpoint, peer: str | None, scheme: str) -> Headers:
    """The client's headers an endpoint gets, then X-Forwarded-For and -Proto, then the endpoint's own `headers`."""
    own = endpoint.config.headers
    dropped = _hop_only(incoming.get("Connection"))
    if own:
        dropped = dropped | {name.lower() for name in own}
    headers = [(name, value) for name, value in incoming.items()
               if _forwarded(name) and not (dropped and name.lower() in dropped)]  # fmt: skip
    prior = incoming.get("x-forwarded-for")
    if peer or prior:
        headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior and peer else peer or prior or ""))
    headers.append(("X-Forwarded-Proto", scheme))
    headers += own.items()
    return headers


# An endpoint's own X-Olla-* would spoof olla's; its CORS headers (llama-server echoes any Origin)
# would open it to browsers whatever `server.cors` says.
NOT_RELAYED_PREFIXES = ("x-olla-", "access-control-")


def response_headers(upstream: Response) -> Headers:
    """The endpoint's headers a client gets: not its framing (Content-Length, chunked), which olla's server sets."""
    dropped = _hop_only(upstream.headers.get("Connection"))
    return [(name, value) for name, value in upstream.raw_headers
            if _relayed(name) and not (dropped and name.lower() in dropped)]  # fmt: skip


# Per header name as sent: clients and endpoints send the same few names again and again.
@functools.lru_cache(maxsize=1024)
def _forwarded(name: str) -> bool:
    return name.lower() not in NOT_FORWARDED


@functools.lru_cache(maxsize=1024)
def _relayed(name: str) -> bool:
    lowered = name.lower()
    return lowered not in FRAMING and not lowered.startswith(NOT_RELAYED_PREFIXES)


def _hop_only(connection: str | None) -> frozenset[str]:
    """The headers a Connection header names as this hop's own (none for the usual keep-alive or close)."""
    if not connection or connection.lower() in ("keep-alive", "close"):
        return frozenset()
    return frozenset(token.strip().lower() for token in connection.split(","))


class Upstream:
    def __init__(self, client: Client, config: ProxyConfig) -> None:
        self.client = client
        self.config = config

    async def _request(self, endpoint: Endpoint, method: str, url: str, headers: Mapping[str, str] | Headers,
                       body: bytes, connect_timeout: float, deadline: float | None = None,
                       close: bool = False) -> Response:  # fmt: skip
        """Send and wait for the response's head; a kept-alive connection the endpoint had closed: once more, fresh.

        TimeoutError when the head has not come by `deadline`.
        """
        try:
            sent = time.monotonic()
            try:
                response = await self.client.request(method, url, headers, body, connect_timeout, deadline=deadline,
                                                     close=close)  # fmt: skip
            except Closed as exc:
                if not exc.reused or time.monotonic() - sent >= STALE:
                    raise
                response = await self.client.request(method, url, headers, body, connect_timeout, fresh=True,
                                                     deadline=deadline, close=close)  # fmt: skip
            return response
        except ConnectTimeout as exc:
            raise UpstreamUnreachable(f"endpoint {endpoint.name} accepted no connection within "
                                      f"{connect_timeout:g}s") from exc  # fmt: skip
        except Closed as exc:
            reason = f": {exc}" if str(exc) else ""
            message = f"endpoint {endpoint.name} closed the connection before answering{reason}"
            raise UpstreamUnreachable(message) from exc
        except TimeoutError:
            raise
        except OSError as exc:
            raise UpstreamUnreachable(f"endpoint {endpoint.name} is unreachable: {exc.strerror or exc}") from exc
        except ValueError as exc:  # Malformed, or a URL that is not http(s)
            raise UpstreamUnreachable(f"endpoint {endpoint.name} failed before answering: {exc}") from exc

    # --- the request path --------------------------------------------------------

    async def send(
        self, endpoint: Endpoint, method: str, path_qs: str, headers: Headers, body: bytes, deadline: float,
        streaming: bool = False,
    ) -> Response:
        """Send one attempt and wait for its headers; a 502/503/504 answer raises UpstreamRejected."""
        url = endpoint.config.url.rstrip("/") + path_qs
        try:  # the deadline is an alarm of the client's (olla.alarms), not a loop timer
            response = await self._request(endpoint, method, url, headers, body, self.config.connection_timeout,
                                           deadline, close=streaming)  # fmt: skip
        except TimeoutError as exc:
            raise UpstreamTimeout(f"endpoint {endpoint.name} sent no response headers in time") from exc
        if response.status in REJECTED:
            try:
                async with asyncio.timeout(self.config.connection_timeout):
                    content = await response.read(REJECTED_BODY_LIMIT)
            except (OSError, ValueError):  # TimeoutError is an OSError
                content = b""
            finally:
                response.close()
            raise UpstreamRejected(
                f"endpoint {endpoint.name} answered {response.status}: {_error_message(content)}",
                response.status, content, dict(response.headers),
            )  # fmt: skip
        return response

    async def body(self, endpoint: Endpoint, response: Response, deadline: float) -> AsyncGenerator[bytes, None]:
        """The response body piece by piece, as it arrives; a break or silence raises UpstreamBroken."""
        read_timeout = self.config.read_timeout
        try:
            while True:
                chunk = response.take()  # what already arrived needs no timer: a small reply comes with its head
                if chunk is None:
                    remaining = deadline - time.monotonic()
                    silence = min(read_timeout, remaining)
                    try:
                        await response.more(time.monotonic() + silence)
                    except TimeoutError as exc:
                        which = "response_timeout" if remaining <= read_timeout else "read_timeout"
                        raise UpstreamBroken(f"endpoint {endpoint.name} went silent ({which} {silence:g}s)") from exc
                    continue
                if not chunk:
                    return
                yield chunk
        except (OSError, ValueError) as exc:  # Closed, or Malformed
            reason = str(exc) or "closed the connection"
            raise UpstreamBroken(f"endpoint {endpoint.name} broke the response off: {reason}") from exc
        finally:
            response.close()  # nothing when it is complete; else the endpoint sees the request end

    # --- probes and discovery ----------------------------------------------------

    async def probe(self, endpoint: Endpoint, url: str) -> Probe:
        started = time.monotonic()
        timeout = endpoint.config.check_timeout
        try:
            status, content = await self._get(endpoint, url, timeout)
        except TimeoutError:
            return Probe(Health.OFFLINE, time.monotonic() - started, f"no answer in {timeout:g}s")
        except UpstreamError as exc:
            return Probe(Health.OFFLINE, time.monotonic() - started, exc.message)
        latency = time.monotonic() - started
        if status == 200:
            return Probe(Health.HEALTHY, latency)
        message = _error_message(content)
        if status == 503 and "loading" in message.lower():
            return Probe(Health.LOADING, latency, message)
        if status in (401, 403):
            return Probe(Health.MISCONFIGURED, latency, f"{status}: {message} (check the endpoint's headers)")
        return Probe(Health.UNHEALTHY, latency, f"{status}: {message}")

    async def get_json(self, endpoint: Endpoint, url: str, timeout: float) -> tuple[int, Any]:
        """GET a JSON document; (status, parsed body or None). Network failures raise UpstreamError."""
        try:
            status, content = await self._get(endpoint, url, timeout)
        except TimeoutError as exc:
            raise UpstreamTimeout(f"endpoint {endpoint.name}: {url} did not answer in {timeout:g}s") from exc
        try:
            return status, orjson.loads(content)
        except orjson.JSONDecodeError:
            return status, None

    async def _get(self, endpoint: Endpoint, url: str, timeout: float) -> tuple[int, bytes]:
        """(status, whole body) of a GET; TimeoutError past `timeout`, UpstreamError for anything else."""
        async with asyncio.timeout(timeout):
            response = await self._request(endpoint, "GET", url, endpoint.config.headers, b"", timeout)
            try:
                return response.status, await response.read()
            except (OSError, ValueError) as exc:  # inside the timer: its own expiry is still a cancellation here
                message = f"endpoint {endpoint.name}: {url}: the answer broke off: {exc or 'closed'}"
                raise UpstreamUnreachable(message) from exc


def _error_message(content: bytes) -> str:
    """llama-server's `{"error":{"message":...}}`, or the start of whatever else it sent."""
    try:
        message = orjson.loads(content)["error"]["message"]
        if isinstance(message, str):
            return message
    except (orjson.JSONDecodeError, KeyError, TypeError):
        pass
    return content[:200].decode("utf-8", "replace").strip() or "(empty body)"
