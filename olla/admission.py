"""Admission: whether a request gets in, decided before any handler runs.

In this order, inside the exchange middleware (so a refusal is rendered as
OpenAI-shaped JSON with `X-Olla-Request-Id` and written to the access log):

1. CORS: a preflight is answered here, before auth and rate limits (browsers send no key with it).
2. Auth: the API key names the client. The health route is always open; the status
   routes (`/internal/status*`, `/metrics`) need a key when `protect_status` is on;
   every other route needs one whenever keys are configured. Else 401.
3. Rate limits: one token from each bucket that applies, keyed by the client, or by
   the caller's address for a request without one. Else 429.

`headers` then adds the CORS and `X-RateLimit-*` headers to every response,
streamed ones included, just before its headers are sent (the server's prepare hook). (Endpoints' own CORS
headers never get that far: `upstream.response_headers` drops them.)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from olla.clients import ANONYMOUS, Clients, caller_address, presented_key
from olla.config import ServerConfig
from olla.cors import PREFLIGHT_STATUS, CorsPolicy, is_preflight
from olla.errors import AuthenticationFailed, RateLimited
from olla.exchange import Exchange
from olla.limits import CALLER, GLOBAL, RateLimiter, Verdict
from olla.messages import Request, Response
from olla.metrics import Metrics

MISSING_KEY = "Missing API key: send it as 'Authorization: Bearer KEY' or 'X-Api-Key: KEY'."
WRONG_KEY = "Incorrect API key provided."


class Admission:
    def __init__(
        self, config: ServerConfig, metrics: Metrics, clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:  # fmt: skip
        self.metrics = metrics
        self.clock, self.wall = clock, wall
        self.config = config
        self._auth(config)
        self._rate_limits(config)
        self._cors(config)

    def reconfigure(self, config: ServerConfig) -> None:
        """Follow a reloaded `server` section; an unchanged section keeps its state (rate-limit buckets)."""
        for section, build in (("auth", self._auth), ("rate_limits", self._rate_limits), ("cors", self._cors)):
            if getattr(config, section) != getattr(self.config, section):
                build(config)
        self.config = config

    def _auth(self, config: ServerConfig) -> None:
        self.clients = Clients((k.key, k.client) for k in config.auth.api_keys)
        self.protect_status = config.auth.protect_status

    def _rate_limits(self, config: ServerConfig) -> None:
        self.limits = config.rate_limits
        self.limiter = RateLimiter(config.rate_limits, self.clock())

    def _cors(self, config: ServerConfig) -> None:
        self.cors = CorsPolicy(config.cors) if config.cors.enabled else None

    def admit(self, request: Request, exchange: Exchange, open_route: bool, status_route: bool) -> Response | None:
        """The answer to a preflight, or None to go on; raises AuthenticationFailed or RateLimited.

        `open_route`: the health route, never keyed; `status_route`: keyed only with `protect_status`.
        """
        if self.cors is not None and is_preflight(request.method, request.headers):
            headers = self.cors.preflight(request.headers.get("Origin"),
                                          request.headers.get("Access-Control-Request-Headers"))  # fmt: skip
            if self.cors.varies:
                headers["Vary"] = "Origin"
            return Response(PREFLIGHT_STATUS, headers=list(headers.items()))
        client = self._client(request, needs_key=not open_route and (self.protect_status or not status_route))
        exchange.client = client
        if not self.limiter.enabled:
            return None
        caller = f"client:{client}" if client else f"ip:{self._address(request)}"
        verdict = self.limiter.admit(caller, open_route or status_route, self.clock())
        if verdict is None:
            return None
        headers = verdict.headers(self.wall())
        exchange.rate_headers = headers
        if not verdict.allowed:
            self.metrics.rate_limited.labels(client or ANONYMOUS, verdict.scope).inc()
            raise RateLimited(_refusal(verdict, client), verdict.retry_after, headers)
        return None

    def _client(self, request: Request, needs_key: bool) -> str | None:
        if not self.clients:
            return None
        key = presented_key(request.headers)
        client = self.clients.lookup(key) if key is not None else None
        if client is None and needs_key:
            raise AuthenticationFailed(MISSING_KEY if key is None else WRONG_KEY)
        return client

    def _address(self, request: Request) -> str:
        limits = self.limits
        return caller_address(request.remote, request.headers.get("X-Forwarded-For"), limits.trust_proxy_headers,
                              limits.trusted_proxy_cidrs)  # fmt: skip

    def headers(self, request: Request, exchange: Exchange, headers: list[tuple[str, str]]) -> None:
        """Add the rate-limit and CORS headers to an answer's headers (not to a preflight's answer)."""
        if self.cors is not None and is_preflight(request.method, request.headers):
            return
        if exchange.rate_headers:
            _add_missing(headers, exchange.rate_headers)
        if self.cors is None:
            return
        if self.cors.varies:
            headers.append(("Vary", "Origin"))
        cors = self.cors.response(request.headers.get("Origin"), [name for name, _ in headers])
        present = {name.lower() for name in cors}
        headers[:] = [(n, v) for n, v in headers if n.lower() not in present]
        headers += cors.items()


def _add_missing(headers: list[tuple[str, str]], extra: Mapping[str, str]) -> None:
    present = {name.lower() for name, _ in headers}
    headers += [(name, value) for name, value in extra.items() if name.lower() not in present]


def _refusal(verdict: Verdict, client: str | None) -> str:
    if verdict.scope == GLOBAL:
        whose = "all callers together"
    elif verdict.scope == CALLER:
        whose = f"client {client}" if client else "your address"
    else:
        whose = f"status requests from {f'client {client}' if client else 'your address'}"
    return (f"Rate limit reached for {whose}: {verdict.limit} requests per minute. "
            f"Please try again in {verdict.retry_after}s.")  # fmt: skip
