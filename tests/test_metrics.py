"""The per-request series olla keeps as plain numbers read out exactly as prometheus_client's own metrics would be."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from olla.metrics import LATENCY_BUCKETS, Metrics

# Below the first bound, on bounds (a bucket counts values <= its bound), between bounds, beyond the last.
SECONDS = [0.0, 0.001, 0.005, 0.0050001, 0.1, 0.3, 1, 2.5, 899.9, 900, 900.5, 5000]


def lines(text: bytes, prefix: str) -> list[str]:
    return sorted(line for line in text.decode().splitlines() if line.startswith(prefix) and "_created" not in line)


def test_durations_render_as_a_prometheus_client_histogram_would() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    histogram = Histogram("olla_request_duration_seconds", "x", ["route"], buckets=LATENCY_BUCKETS, registry=reference)
    for seconds in SECONDS:
        metrics.answered("a", "m", "/v1/chat/completions", 200, "anonymous", seconds)
        histogram.labels("/v1/chat/completions").observe(seconds)
    ours = lines(metrics.render(), "olla_request_duration_seconds")
    assert ours == lines(generate_latest(reference), "olla_request_duration_seconds")
    assert 'olla_request_duration_seconds_bucket{le="0.005",route="/v1/chat/completions"} 3.0' in ours
    assert 'olla_request_duration_seconds_bucket{le="+Inf",route="/v1/chat/completions"} 12.0' in ours


def test_counts_render_as_prometheus_client_counters_would() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter("olla_requests", "x", ["endpoint", "model", "route", "code"], registry=reference)
    for code in (200, 200, 503):
        metrics.answered("a", "m", "/completion", code, "team-a", 0.01)
        requests.labels("a", "m", "/completion", str(code)).inc()
    text = metrics.render()
    assert lines(text, "olla_requests_total") == lines(generate_latest(reference), "olla_requests_total")
    assert 'olla_client_requests_total{client="team-a",code="200",route="/completion"} 2.0' in lines(
        text, "olla_client_requests_total"
    )


def test_in_flight_and_time_to_first_byte_follow_attempts() -> None:
    metrics = Metrics()
    metrics.declare(["a", "b"])
    metrics.entered("a")
    metrics.entered("a")
    metrics.left("a")
    metrics.first_byte("a", 0.02)
    text = metrics.render().decode()
    assert 'olla_requests_in_flight{endpoint="a"} 1.0' in text
    assert 'olla_requests_in_flight{endpoint="b"} 0.0' in text
    assert 'olla_upstream_ttfb_seconds_bucket{endpoint="a",le="0.01"} 0.0' in text
    assert 'olla_upstream_ttfb_seconds_bucket{endpoint="a",le="0.025"} 1.0' in text
    assert 'olla_upstream_ttfb_seconds_count{endpoint="a"} 1.0' in text
