"""Every Prometheus metric olla exports, with its labels; the only prometheus_client user.

Each app owns its own CollectorRegistry, so several routers can live in one
process (tests, the demo). Label values come from small fixed sets: endpoint
names from the config, model ids the endpoints reported, profile route paths,
status codes, client ids from the config (never a key or an address).

The series every proxied request touches (requests, client requests, request
duration, in flight, time to first byte) are plain numbers in `Tallies`, read by
prometheus_client only when scraped: its own metrics take a lock per update, and
taking those five series out saved 6-11% of the router's CPU per request in two
ablations (bench/results/overhead-notes.md). The rest are prometheus_client's.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Iterable, Iterator
from typing import TypeVar

from prometheus_async.aio import time as timed
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

T = TypeVar("T")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
HEALTH_STATES = ["unknown", "healthy", "loading", "offline", "unhealthy", "misconfigured"]
CONTENT_TYPE = CONTENT_TYPE_LATEST
BUCKET_LABELS = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.tallies = Tallies()
        r.register(self.tallies)
        self.rate_limited = Counter(
            "olla_rate_limited", "Requests answered 429, by client and the empty bucket (global, client, status)",
            ["client", "scope"], registry=r,
        )  # fmt: skip
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

    def entered(self, endpoint: str) -> None:
        """An attempt on the endpoint started."""
        in_flight = self.tallies.in_flight
        in_flight[endpoint] = in_flight.get(endpoint, 0) + 1

    def left(self, endpoint: str) -> None:
        self.tallies.in_flight[endpoint] -= 1

    def first_byte(self, endpoint: str, seconds: float) -> None:
        """The endpoint's response headers came `seconds` after the request did."""
        tallies = self.tallies
        buckets = tallies.ttfb.get(endpoint)
        if buckets is None:
            buckets = tallies.ttfb[endpoint] = Buckets()
        buckets.observe(seconds)

    def answered(self, endpoint: str, model: str, route: str, code: int, client: str, seconds: float) -> None:
        """Count one answered request."""
        tallies = self.tallies
        key = (endpoint, model, route, code)
        tallies.requests[key] = tallies.requests.get(key, 0) + 1
        by_client = (client, route, code)
        tallies.client_requests[by_client] = tallies.client_requests.get(by_client, 0) + 1
        buckets = tallies.duration.get(route)
        if buckets is None:
            buckets = tallies.duration[route] = Buckets()
        buckets.observe(seconds)

    def declare(self, endpoints: Iterable[str]) -> None:
        """Create every endpoint's series up front, so a dashboard sees zeros rather than gaps."""
        for name in endpoints:
            self.health.labels(name).state("unknown")
            self.tallies.in_flight.setdefault(name, 0)

    def time_probe(self, endpoint: str, probe: Awaitable[T]) -> Awaitable[T]:
        return timed(self.probe_duration.labels(endpoint), probe)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class Buckets:
    """A histogram's counts over LATENCY_BUCKETS (the last one is +Inf) and their sum."""

    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(LATENCY_BUCKETS, value)] += 1  # the first bucket whose bound is >= value
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        cumulative, total = [], 0
        for label, count in zip(BUCKET_LABELS, self.counts, strict=True):
            total += count
            cumulative.append((label, float(total)))
        return cumulative


class Tallies(Collector):
    """The per-request series as plain numbers, turned into Prometheus metrics when scraped."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, int], int] = {}  # endpoint, model, route, code
        self.client_requests: dict[tuple[str, str, int], int] = {}  # client, route, code
        self.duration: dict[str, Buckets] = {}  # by route
        self.ttfb: dict[str, Buckets] = {}  # by endpoint
        self.in_flight: dict[str, int] = {}  # by endpoint

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("olla_requests", "Requests answered, by endpoint, model, route and status code",
                                       labels=["endpoint", "model", "route", "code"])  # fmt: skip
        for (endpoint, model, route, code), count in list(self.requests.items()):
            requests.add_metric([endpoint, model, route, str(code)], count)
        yield requests
        client_requests = CounterMetricFamily(
            "olla_client_requests", "Requests answered, by client (anonymous without one), route and status code",
            labels=["client", "route", "code"],
        )  # fmt: skip
        for (client, route, code), count in list(self.client_requests.items()):
            client_requests.add_metric([client, route, str(code)], count)
        yield client_requests
        yield _histogram("olla_request_duration_seconds", "Time from request receipt to the last byte sent",
                         "route", self.duration)  # fmt: skip
        yield _histogram("olla_upstream_ttfb_seconds", "Time from request receipt to the endpoint's response headers",
                         "endpoint", self.ttfb)  # fmt: skip
        in_flight = GaugeMetricFamily("olla_requests_in_flight", "Requests being proxied", labels=["endpoint"])
        for endpoint, count in list(self.in_flight.items()):
            in_flight.add_metric([endpoint], count)
        yield in_flight


def _histogram(name: str, documentation: str, label: str, by_label: dict[str, Buckets]) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, documentation, labels=[label])
    for value, buckets in list(by_label.items()):
        family.add_metric([value], buckets.cumulative(), buckets.sum)
    return family
