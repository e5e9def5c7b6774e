"""The probe loop: each endpoint checked on its own interval, not on a shared tick.

The next probe's delay comes from the endpoint's state (sooner while loading,
backing off while offline). A breaker ejection waits for the next scheduled
probe: probing at once would let an endpoint that fails requests but answers
/health bounce straight back.
"""

from __future__ import annotations

import logging
import time

from olla.endpoint import Endpoint
from olla.metrics import Metrics
from olla.profiles import Profile
from olla.registry import Registry, pause
from olla.upstream import Upstream

log = logging.getLogger("olla.health")


async def check(registry: Registry, upstream: Upstream, endpoint: Endpoint, profile: Profile, metrics: Metrics) -> None:
    """One probe, recorded; asks for discovery when the endpoint has just recovered."""
    url = endpoint.url_for(endpoint.config.health_check_url, profile.health_path)
    before = endpoint.health
    probe = await metrics.time_probe(endpoint.name, upstream.probe(endpoint, url))
    recovered = registry.record_probe(endpoint, probe, time.monotonic())
    if recovered or (endpoint.routable and endpoint.discovery is None):
        registry.discovery_event(endpoint).set()
    if endpoint.health is not before:
        log.info("health changed", extra={"endpoint": endpoint.name, "from": before.value,
                                          "to": endpoint.health.value, "detail": probe.detail})  # fmt: skip


async def run(registry: Registry, upstream: Upstream, endpoint: Endpoint, profile: Profile, metrics: Metrics) -> None:
    """Probe on the endpoint's schedule; an offline endpoint's backoff ends early when requests need it."""
    wanted = registry.probe_event(endpoint)
    while True:
        await check(registry, upstream, endpoint, profile, metrics)
        wanted.clear()
        await pause(endpoint.next_probe_in(), endpoint.config.check_interval, wanted)
