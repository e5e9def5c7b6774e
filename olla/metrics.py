"""Every Prometheus metric olla exports, with its labels; the only prometheus_client user.

Each app owns its own CollectorRegistry, so several routers can live in one
process (tests, the demo). Label values come from small fixed sets: endpoint
names from the config, model ids the endpoints reported, profile route paths,
status codes, client ids from the config (never a key or an address).
"""

from __future__ import annotations

from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from prometheus_async.aio import time as timed
from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

T = TypeVar("T")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
HEALTH_STATES = ["unknown", "healthy", "loading", "offline", "unhealthy", "misconfigured"]
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "olla_requests", "Requests answered, by endpoint, model, route and status code",
            ["endpoint", "model", "route", "code"], registry=r,
        )  # fmt: skip
        self.client_requests = Counter(
            "olla_client_requests", "Requests answered, by client (anonymous without one), route and status code",
            ["client", "route", "code"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "olla_rate_limited", "Requests answered 429, by client and the empty bucket (global, client, status)",
            ["client", "scope"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "olla_request_duration_seconds", "Time from request receipt to the last byte sent",
            ["route"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "olla_upstream_ttfb_seconds", "Time from request receipt to the endpoint's response headers",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.in_flight = Gauge("olla_requests_in_flight", "Requests being proxied", ["endpoint"], registry=r)
        self.retries = Counter(
            "olla_retries", "Attempts that failed over to another endpoint, by the failed endpoint and reason",
            ["endpoint", "reason"], registry=r,
        )  # fmt: skip
        self.health = Enum(
            "olla_endpoint_health", "Endpoint health state", ["endpoint"], states=HEALTH_STATES, registry=r
        )
        self.probe_duration = Histogram(
            "olla_health_check_duration_seconds", "Duration of active health checks",
            ["endpoint"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.slots = Gauge("olla_endpoint_slots", "llama.cpp slots an endpoint has", ["endpoint"], registry=r)
        self.busy_slots = Gauge(
            "olla_endpoint_busy_slots", "Busy slots: the router's own requests plus other clients' seen in /slots",
            ["endpoint"], registry=r,
        )  # fmt: skip
        self.queue_length = Gauge("olla_queue_length", "Requests waiting in the router for a slot", ["model"], registry=r)
        self.queue_wait = Histogram(
            "olla_queue_wait_seconds", "Time requests waited in the router for a slot",
            ["model"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_rejected = Counter(
            "olla_queue_rejected", "Requests answered 503 slots_exhausted, by reason (full, timeout)",
            ["model", "reason"], registry=r,
        )  # fmt: skip
        self._answered: dict[tuple[str, str, str, int, str], tuple[Any, Any, Any]] = {}
        self._attempts: dict[str, tuple[Any, Any]] = {}

    def attempt(self, endpoint: str) -> tuple[Any, Any]:
        """An endpoint's `in_flight` and `ttfb` series, looked up once and kept (as in `answered`)."""
        series = self._attempts.get(endpoint)
        if series is None:
            series = self._attempts[endpoint] = (self.in_flight.labels(endpoint), self.ttfb.labels(endpoint))
        return series

    def answered(self, endpoint: str, model: str, route: str, code: int, client: str, seconds: float) -> None:
        """Count one answered request. Its series are looked up once per label set and kept:
        `labels()` was 3% of the router's CPU on small requests (bench/results/overhead-notes.md)."""
        key = (endpoint, model, route, code, client)
        series = self._answered.get(key)
        if series is None:
            series = self._answered[key] = (
                self.requests.labels(endpoint, model, route, str(code)),
                self.client_requests.labels(client, route, str(code)),
                self.duration.labels(route),
            )
        requests, client_requests, duration = series
        requests.inc()
        client_requests.inc()
        duration.observe(seconds)

    def declare(self, endpoints: Iterable[str]) -> None:
        """Create every endpoint's series up front, so a dashboard sees zeros rather than gaps."""
        for name in endpoints:
            self.health.labels(name).state("unknown")
            self.in_flight.labels(name).set(0)

    def time_probe(self, endpoint: str, probe: Awaitable[T]) -> Awaitable[T]:
        return timed(self.probe_duration.labels(endpoint), probe)

    def render(self) -> bytes:
        return generate_latest(self.registry)
