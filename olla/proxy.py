"""The request path: match an allowed route, resolve the model, run attempts, stream the answer back.

What the router refuses before any endpoint sees a request is in `requestcheck`:
a path outside the allowlist, or sent with percent-escapes where the allowlist has
none, a body that is not JSON, a field the router reads with the wrong type.

A request that takes a llama.cpp slot claims one through the router's queue
before its attempt and gives it back when the attempt ends. Failover happens
only before the response is prepared: once a byte has gone to the client an
attempt is final. A stream that breaks afterwards ends with an SSE `error`
event (or a cut connection for non-SSE bodies) so the client knows.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import orjson

from olla import http1, requestcheck
from olla.affinity import AffinityMap, Keys, keys_for
from olla.balancer import BALANCERS, Balancer
from olla.config import Config, ProxyConfig
from olla.endpoint import Endpoint, Outcome
from olla.errors import (
    MethodNotAllowed, NoHealthyEndpoint, RequestFailed, RouteNotFound, UpstreamBroken,
    UpstreamError, UpstreamRejected, UpstreamTimeout, UpstreamUnreachable,
)  # fmt: skip
from olla.exchange import Answer, Exchange
from olla.metrics import Metrics
from olla.profiles import Profile, Route
from olla.registry import Pool, Registry
from olla.messages import Request, Response
from olla.slotqueue import SlotQueue
from olla.upstream import Upstream, request_headers, response_headers
from olla.wire import VIA

BODY_TIMEOUT = 30.0  # longest silence while a client sends its body: a slow-loris body gets 408
SESSION_HEADER = "X-Olla-Session-ID"


@dataclass(slots=True)
class Plan:
    """What one request needs for its attempts."""

    profile: Profile
    route: Route
    pool: Pool
    path_qs: str
    body: bytes
    streaming: bool
    keys: Keys | None = None
    preferred: Endpoint | None = None
    held_for: int | None = None  # the conversation key the slot is kept for once the attempt ends


class Proxy:
    def __init__(
        self, config: Config, registry: Registry, upstream: Upstream, metrics: Metrics, queue: SlotQueue
    ) -> None:  # fmt: skip
        self.config = config
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.queue = queue
        self.affinity = _affinity_map(config.proxy)

    @property
    def balancer(self) -> Balancer:
        return self.queue.balancer  # one balancer for queued and direct picks

    def configure(self, config: Config) -> None:
        """Follow a reloaded config: requests that start from now on use its `proxy` and `server` settings."""
        old, new = self.config.proxy, config.proxy
        self.config = config
        if new == old:
            return
        self.upstream = Upstream(self.upstream.client, new)
        if new.load_balancer != old.load_balancer:
            self.queue.balancer = BALANCERS[new.load_balancer]()
        if (new.affinity, new.load_balancer) != (old.affinity, old.load_balancer):
            self.affinity = _affinity_map(new)
        self.queue.max_size, self.queue.timeout = new.queue.max_size, new.queue.timeout
        self.queue.hold = new.affinity.hold

    async def handle(self, request: Request, exchange: Exchange, profile: Profile, path: str) -> Answer:
        """Forward `request`, whose path under the profile's prefix is `path` (as sent, with its leading "/")."""
        route = self._route(profile, path, request)
        exchange.route = route.path
        limit = self.config.server.max_body_size
        body = await request.read(limit, BODY_TIMEOUT)
        document = requestcheck.read(body, route, profile.model_field)
        exchange.model = self._model(request, profile, route, document)
        session = requestcheck.header_text(request.headers, SESSION_HEADER)
        pool = self.registry.pool(exchange.model, profile.name)
        exchange.model = pool.model
        exchange.strategy = self.balancer.name
        query = request.query_string  # as sent: decoding would turn %26 into a parameter boundary
        plan = Plan(
            profile, route, pool, path + (f"?{query}" if query else ""), body,
            streaming=isinstance(document, dict) and document.get("stream") is True,
        )  # fmt: skip
        if self.affinity is not None and route.takes_slot:
            plan.keys = keys_for(pool.model, route.path, document, session)
            name = self.affinity.find(plan.keys, time.monotonic()) if plan.keys else None
            plan.preferred = self.registry.endpoints.get(name) if name else None
        try:
            return await self._attempts(request, exchange, plan)
        except NoHealthyEndpoint:
            self.registry.probe_soon(pool)  # demand: an endpoint backing off its probes may be back already
            raise

    def _route(self, profile: Profile, path: str, request: Request) -> Route:
        route = profile.route(path)  # the allowlist matches the path as sent: %2F or %2E never reach a route
        if route is None:
            if "%" in path:
                raise RouteNotFound(f"{request.raw_path} is not a {profile.name} route olla forwards: "
                                    "send the path without percent-escapes (see docs/endpoints.md)")  # fmt: skip
            raise RouteNotFound(f"{path} is not a {profile.name} route olla forwards (see docs/endpoints.md)")
        if request.method not in route.methods:
            raise MethodNotAllowed(request.method, path, ", ".join(sorted(route.methods)))
        return route

    @staticmethod
    def _model(request: Request, profile: Profile, route: Route, document: object) -> str | None:
        if route.model_from_body and isinstance(document, dict):
            model = document.get(profile.model_field)
            if isinstance(model, str):
                return model  # never empty: requestcheck.read refused that
        return requestcheck.header_text(request.headers, profile.model_header)

    async def _choose(self, plan: Plan, tried: list[Endpoint]) -> Endpoint | None:
        """The next endpoint to try (with a slot claimed when the route takes one), or None when none is left."""
        tiers = plan.pool.tiers(tried)
        if not tiers:
            return None
        if plan.route.takes_slot:
            return await self.queue.acquire(plan.pool, tried, plan.preferred, plan.keys, tiers)
        return self.balancer.pick(tiers, None, need_slot=False)

    async def _attempts(self, request: Request, exchange: Exchange, plan: Plan) -> Answer:
        settings = self.config.proxy
        deadline = exchange.started + settings.response_timeout
        max_attempts = (settings.retry.max_attempts or len(self.registry) or 1) if settings.retry.enabled else 1
        tried: list[Endpoint] = []
        failures: list[UpstreamError] = []
        while len(tried) < max_attempts and (endpoint := await self._choose(plan, tried)) is not None:
            tried.append(endpoint)
            exchange.attempts += 1
            headers = request_headers(request.headers, endpoint, request.remote, request.scheme)
            self._enter(endpoint)
            headers_by = deadline
            if not plan.route.takes_slot:  # it cannot be waiting for a generation: silence means a stuck endpoint
                headers_by = min(deadline, time.monotonic() + settings.header_timeout)
            sent = time.monotonic()
            try:
                upstream = await self.upstream.send(
                    endpoint, request.method, plan.path_qs, headers, plan.body, headers_by, plan.streaming
                )
            except UpstreamError as exc:
                self._leave(endpoint, plan)
                outcome = Outcome.REJECTED if isinstance(exc, UpstreamRejected) else Outcome.UNREACHABLE
                timeout = isinstance(exc, UpstreamTimeout)
                since = sent if timeout else None  # a timeout is old news
                # The request's own time ran out (told by the limit, not the clock: uvloop fires timers a little early).
                at_deadline = timeout and headers_by == deadline
                # What earlier attempts left of the deadline is no measure of this endpoint: it counts, never ejects.
                leftover = at_deadline and bool(failures)
                self.registry.record_outcome(endpoint, outcome, exc.message, since, conclusive=not leftover)
                self.metrics.retries.labels(endpoint.name, exc.code).inc()
                failures.append(exc)
                if at_deadline:
                    break
                continue
            except BaseException:
                self._leave(endpoint, plan)
                raise
            try:
                return await self._relay(request, exchange, plan, endpoint, upstream, deadline)
            finally:
                self._leave(endpoint, plan)
        if not failures:
            raise NoHealthyEndpoint(plan.pool.unavailable_reason())
        exchange.reason = "all_attempts_failed"
        raise _summary(failures, plan.pool)

    def _enter(self, endpoint: Endpoint) -> None:
        endpoint.in_flight += 1
        endpoint.requests += 1
        self.metrics.entered(endpoint.name)

    def _leave(self, endpoint: Endpoint, plan: Plan) -> None:
        endpoint.in_flight -= 1
        self.metrics.left(endpoint.name)
        if plan.route.takes_slot:
            self.queue.release(endpoint, plan.held_for)
            plan.held_for = None

    async def _relay(
        self, request: Request, exchange: Exchange, plan: Plan, endpoint: Endpoint,
        upstream: http1.Response, deadline: float,
    ) -> Answer:  # fmt: skip
        now = time.monotonic()
        exchange.ttfb = now - exchange.started
        exchange.endpoint = endpoint.name
        exchange.model_id = endpoint.discovery.models[0] if endpoint.discovery else None
        first = exchange.attempts == 1
        exchange.decision = "routed" if first else "fallback"
        exchange.reason = "model_found" if first else f"failover_after_{exchange.attempts - 1}"
        self.metrics.first_byte(endpoint.name, exchange.ttfb)
        is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
        whole = None if is_sse else upstream.whole()
        headers = response_headers(upstream)  # the server frames the body itself
        headers += olla_headers(exchange, plan.profile, endpoint, plan.pool)
        if self.affinity is not None and plan.route.takes_slot:
            headers.append(("X-Olla-Affinity", _affinity(plan.preferred, endpoint)))
            if plan.keys is not None and upstream.status < 400:
                self.affinity.remember(plan.keys, endpoint.name, now)
                if plan.preferred is not None:  # a conversation seen before: its slot is kept for its next turn
                    plan.held_for = plan.keys.record  # (not after a first turn or a one-shot, which looks the same)
        exchange.status = upstream.status
        if whole is not None:  # all here: headers and body go out in one write, not two (~5% of CPU, overhead-notes.md)
            self.registry.record_outcome(endpoint, Outcome.OK)
            return Response(upstream.status, whole, headers, upstream.reason)
        response = await request.stream(upstream.status, upstream.reason, headers)
        events = 0
        try:
            async with contextlib.aclosing(self.upstream.body(endpoint, upstream, deadline)) as chunks:
                async for chunk in chunks:
                    await response.write(chunk)
                    exchange.bytes_sent += len(chunk)
                    events += chunk.count(b"\n\n")
        except UpstreamBroken as exc:
            self.registry.record_outcome(endpoint, Outcome.BROKEN, exc.message)
            if not is_sse:
                response.cut()  # the client sees the body end short
                return response
            event = b"data: " + orjson.dumps(exc.body()) + b"\n\n"
            await response.write(event)
            exchange.bytes_sent += len(event)
        else:
            self.registry.record_outcome(endpoint, Outcome.OK)
            if is_sse and upstream.status == 200:
                streamed = time.monotonic() - now
                endpoint.record_speed(exchange.ttfb, events / streamed if events > 1 and streamed > 0 else None)
        await response.end()
        return response


def _affinity(preferred: Endpoint | None, served: Endpoint) -> str:
    if preferred is None:
        return "miss"
    return "hit" if preferred is served else "moved"


def olla_headers(exchange: Exchange, profile: Profile, endpoint: Endpoint, pool: Pool) -> list[tuple[str, str]]:
    return [
        ("X-Olla-Endpoint", endpoint.name),
        ("X-Olla-Backend-Type", profile.name),
        ("X-Olla-Model", pool.model),
        ("X-Olla-Response-Time", f"{round((exchange.ttfb or 0) * 1000)}ms"),
        ("Via", VIA),
        ("X-Olla-Routing-Strategy", exchange.strategy or ""),
        ("X-Olla-Routing-Decision", exchange.decision),
        ("X-Olla-Routing-Reason", exchange.reason),
    ]


def _affinity_map(settings: ProxyConfig) -> AffinityMap | None:
    affinity = settings.affinity
    if affinity.enabled and settings.load_balancer == "slot-aware":  # affinity is part of slot-aware routing
        return AffinityMap(affinity.max_entries, affinity.ttl)
    return None


def _summary(failures: list[UpstreamError], pool: Pool) -> RequestFailed:
    """One error for a request whose every attempt failed.

    When every attempt found its endpoint down (unreachable, or answering 502/503/504)
    and the pool has no healthy member left, the model is unavailable: 503 with
    Retry-After, as the next request would get at once. Otherwise the last attempt's status.
    """
    tried = "; ".join(f.message for f in failures)
    if not pool.tiers() and all(isinstance(f, (UpstreamUnreachable, UpstreamRejected)) for f in failures):
        return NoHealthyEndpoint(f"{pool.unavailable_reason()}; every attempt failed: {tried}")
    last = failures[-1]
    if len(failures) == 1:
        return last
    summary = type(last)(f"all {len(failures)} attempts failed: {tried}")
    if isinstance(last, UpstreamRejected):
        summary = UpstreamRejected(summary.message, last.status, last.upstream_body, last.upstream_headers)
    return summary
