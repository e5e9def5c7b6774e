"""Pure routing logic: endpoint transitions, model resolution, pools and balancers. No I/O, no sleeps."""

from __future__ import annotations

import logging
import random
from collections import Counter

import pytest

from olla.balancer import BALANCERS, LeastConnections, Priority, RoundRobin
from olla.config import EndpointConfig
from olla.endpoint import Discovery, Endpoint, Health, Outcome, Probe
from olla.errors import ModelNotFound, ModelRequired, NoHealthyEndpoint
from olla.registry import POOLS_KEPT, Registry


def cfg(name: str, priority: int = 100, interval: float = 5.0, kind: str = "llamacpp") -> EndpointConfig:
    return EndpointConfig(name=name, url=f"http://{name}:8080", priority=priority, check_interval=interval,
                          check_timeout=1.0, type=kind)  # fmt: skip


def healthy(registry: Registry, name: str, *models: str) -> Endpoint:
    endpoint = registry.endpoints[name]
    registry.record_probe(endpoint, Probe(Health.HEALTHY, 0.001), now=1.0)
    registry.record_discovery(endpoint, Discovery(models=models, total_slots=2), now=1.0)
    return endpoint


# --- endpoint state ---------------------------------------------------------------


def test_probe_results_set_health_and_report_recovery() -> None:
    e = Endpoint(cfg("a"))
    assert not e.routable and e.health is Health.UNKNOWN
    assert e.record_probe(Probe(Health.LOADING, 0.01, "Loading model"), now=1) is False
    assert not e.routable
    assert e.record_probe(Probe(Health.HEALTHY, 0.01), now=2) is False  # one good check is not enough
    assert not e.routable and "1 of 2" in e.detail and e.next_probe_in() == 1.0
    assert e.record_probe(Probe(Health.HEALTHY, 0.01), now=3) is True  # recovery
    assert e.record_probe(Probe(Health.HEALTHY, 0.01), now=4) is False  # still healthy: no new recovery
    assert e.routable


def test_an_endpoint_starting_up_is_healthy_at_its_first_good_check() -> None:
    e = Endpoint(cfg("a"))
    assert e.record_probe(Probe(Health.HEALTHY, 0.01), now=0) is True and e.routable


def test_a_flapping_endpoint_stays_out_until_two_good_checks_in_a_row() -> None:
    e = Endpoint(cfg("a"))
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=0)
    for now, health in enumerate([Health.OFFLINE, Health.HEALTHY, Health.OFFLINE, Health.HEALTHY], start=1):
        e.record_probe(Probe(health, 0.01), now=now)
        assert not e.routable, now
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=6)
    assert e.routable


def test_loading_is_rechecked_sooner_and_offline_backs_off_to_a_cap() -> None:
    e = Endpoint(cfg("a", interval=5.0))
    e.record_probe(Probe(Health.LOADING, 0.01), now=0)
    assert e.next_probe_in() == 1.0
    delays = []
    for i in range(8):
        e.record_probe(Probe(Health.OFFLINE, 0.01, "refused"), now=i)
        delays.append(e.next_probe_in())
    assert delays[0] == 5.0
    assert delays == sorted(delays) and delays[1] > delays[0]
    assert delays[-1] == 30.0
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=9)
    assert e.next_probe_in() == 1.0  # recovering: the confirming check comes soon
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=10)
    assert e.routable and e.next_probe_in() == 5.0


def test_breaker_ejects_at_once_and_only_a_good_probe_brings_it_back() -> None:
    e = Endpoint(cfg("a"))
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=0)
    assert e.record_outcome(Outcome.OK) is False and e.routable
    assert e.record_outcome(Outcome.REJECTED, "answered 503") is True
    assert e.health is Health.UNHEALTHY and "503" in e.detail
    assert e.record_outcome(Outcome.UNREACHABLE) is False  # already out
    assert e.errors == 2
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=1)
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=2)
    assert e.routable and e.breaker_failures == 0


def test_a_timeout_older_than_a_success_counts_but_does_not_eject() -> None:
    e = Endpoint(cfg("a"))
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=0)
    e.record_outcome(Outcome.OK, now=10.0)
    assert e.record_outcome(Outcome.UNREACHABLE, "timed out", now=11.0, since=9.0) is False  # began before the success
    assert e.routable and e.errors == 1
    assert e.record_outcome(Outcome.UNREACHABLE, "timed out", now=12.0, since=10.5) is True  # nothing good since


def test_a_timeout_without_enough_time_to_tell_counts_but_does_not_eject() -> None:
    e = Endpoint(cfg("a"))
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=0)
    assert e.record_outcome(Outcome.UNREACHABLE, "timed out", now=11.0, since=10.9, conclusive=False) is False
    assert e.routable and e.errors == 1


def test_a_breaker_ejection_is_logged_with_its_reason(caplog: pytest.LogCaptureFixture) -> None:
    registry = Registry([cfg("a")])
    endpoint = healthy(registry, "a", "m")
    with caplog.at_level(logging.INFO, logger="olla.health"):
        assert registry.record_outcome(endpoint, Outcome.REJECTED, "endpoint a answered 503") is True
        assert registry.record_outcome(endpoint, Outcome.REJECTED, "endpoint a answered 503") is False  # already out
    (record,) = caplog.records
    assert record.getMessage() == "health changed"
    assert (record.endpoint, record.to, record.detail) == ("a", "unhealthy", "breaker: endpoint a answered 503")


def test_unreachable_attempt_marks_offline() -> None:
    e = Endpoint(cfg("a"))
    e.record_probe(Probe(Health.HEALTHY, 0.01), now=0)
    e.record_outcome(Outcome.UNREACHABLE, "connection refused")
    assert e.health is Health.OFFLINE


def test_url_for_joins_paths_and_keeps_absolute_urls() -> None:
    e = Endpoint(EndpointConfig(name="a", url="http://h:1/base/"))
    assert e.url_for(None, "/health") == "http://h:1/base/health"
    assert e.url_for("/v1/health", "/health") == "http://h:1/base/v1/health"
    assert e.url_for("https://other/x", "/health") == "https://other/x"


# --- registry and pools -----------------------------------------------------------


def test_a_model_file_name_matches_a_path_id_and_aliases_match() -> None:
    registry = Registry([cfg("a"), cfg("b")], {"chat": ["/models/llama-8b.gguf"]})
    healthy(registry, "a", "/models/llama-8b.gguf")
    healthy(registry, "b", "coder", "coder-alias")
    assert [e.name for e in registry.pool("llama-8b.gguf").members] == ["a"]
    assert [e.name for e in registry.pool("/models/llama-8b.gguf").members] == ["a"]
    assert [e.name for e in registry.pool("chat").members] == ["a"]
    assert [e.name for e in registry.pool("coder-alias").members] == ["b"]
    with pytest.raises(ModelNotFound, match="Model not found: missing"):
        registry.pool("missing")


def test_no_model_means_the_only_model_or_a_400_listing_them() -> None:
    registry = Registry([cfg("a"), cfg("b")])
    healthy(registry, "a", "m1")
    healthy(registry, "b", "m1")
    assert registry.pool(None).model == "m1"
    healthy(registry, "b", "m2")
    with pytest.raises(ModelRequired, match="m1, m2"):
        registry.pool(None)


def test_an_undiscovered_endpoint_makes_an_unknown_model_a_503_not_a_404() -> None:
    registry = Registry([cfg("a"), cfg("b")])
    healthy(registry, "a", "m1")
    with pytest.raises(NoHealthyEndpoint, match="not yet discovered: b"):
        registry.pool("m2")


def test_a_pool_follows_discovery_and_reloads_though_it_is_looked_up_once() -> None:
    registry = Registry([cfg("a"), cfg("b")])
    healthy(registry, "a", "m")
    healthy(registry, "b", "other")
    assert registry.pool("m") is registry.pool("m")  # kept between requests
    assert [e.name for e in registry.pool("m").members] == ["a"]
    registry.record_discovery(registry.endpoints["b"], Discovery(models=("m",)), 0.0)
    assert [e.name for e in registry.pool("m").members] == ["a", "b"]
    registry.replace([cfg("a"), cfg("b")], {"alias": ["m"]})
    assert [e.name for e in registry.pool("alias").members] == ["a", "b"]
    registry.replace([cfg("b")], {})
    assert [e.name for e in registry.pool("m").members] == ["b"]
    with pytest.raises(ModelNotFound):
        registry.pool("alias")


def test_pools_kept_stay_bounded_whatever_model_names_clients_send() -> None:
    registry = Registry([cfg("a")])
    healthy(registry, "a", "/models/x.gguf")
    for i in range(3 * POOLS_KEPT):
        assert registry.pool(f"/dir{i}/x.gguf").members == (registry.endpoints["a"],)
    assert len(registry._pools) <= POOLS_KEPT


def names(tiers: list[list[Endpoint]]) -> list[list[str]]:
    return [[e.name for e in tier] for tier in tiers]


def test_tiers_group_routable_members_by_priority_best_first() -> None:
    registry = Registry([cfg("hi1", 100), cfg("hi2", 100), cfg("lo", 50)])
    for name in ("hi1", "hi2", "lo"):
        healthy(registry, name, "m")
    pool = registry.pool("m")
    assert names(pool.tiers()) == [["hi1", "hi2"], ["lo"]]
    assert names(pool.tiers(exclude=[registry.endpoints["hi1"]])) == [["hi2"], ["lo"]]
    registry.record_outcome(registry.endpoints["hi1"], Outcome.UNREACHABLE)
    registry.record_outcome(registry.endpoints["hi2"], Outcome.REJECTED)
    assert names(pool.tiers()) == [["lo"]]
    registry.record_outcome(registry.endpoints["lo"], Outcome.UNREACHABLE)
    assert pool.tiers() == []
    assert "hi1=offline" in pool.unavailable_reason() and "hi2=unhealthy" in pool.unavailable_reason()


def test_pools_only_hold_endpoints_of_the_requested_profile() -> None:
    registry = Registry([cfg("a"), cfg("b", kind="other")])
    healthy(registry, "a", "m")
    healthy(registry, "b", "m")
    assert [e.name for e in registry.pool("m", "llamacpp").members] == ["a"]


# --- balancers --------------------------------------------------------------------


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(cfg(f"e{i}")) for i in range(n)]


def test_round_robin_takes_turns() -> None:
    es = endpoints(3)
    rr = RoundRobin()
    assert [rr.pick([es]).name for _ in range(6)] == ["e0", "e1", "e2", "e0", "e1", "e2"]


def test_rotation_stays_fair_per_pool_when_pools_interleave() -> None:
    pool_a, pool_b = endpoints(2), [Endpoint(cfg("solo"))]
    for balancer in (RoundRobin(), LeastConnections()):
        picks = []
        for _ in range(6):
            picks.append(balancer.pick([pool_a]).name)
            balancer.pick([pool_b])
        assert picks == ["e0", "e1"] * 3, balancer.name


def test_least_connections_picks_the_idlest_and_rotates_ties() -> None:
    es = endpoints(3)
    lc = LeastConnections()
    es[0].in_flight, es[1].in_flight, es[2].in_flight = 2, 0, 1
    assert lc.pick([es]).name == "e1"
    es[1].in_flight = 1
    assert {lc.pick([es]).name for _ in range(4)} == {"e1", "e2"}


def test_priority_spreads_randomly_inside_the_tier() -> None:
    es = endpoints(2)
    balancer = Priority(random.Random(7))
    counts = Counter(balancer.pick([es]).name for _ in range(1000))
    assert 400 < counts["e0"] < 600


def test_classic_balancers_use_the_best_tier_and_never_wait() -> None:
    best, lower = endpoints(2), [Endpoint(cfg("low", 1))]
    for name in ("priority", "round-robin", "least-connections"):
        for _ in range(4):
            assert BALANCERS[name]().pick([best, lower]) in best


def test_balancers_are_chosen_by_their_config_names() -> None:
    assert set(BALANCERS) >= {"slot-aware", "priority", "round-robin", "least-connections"}
    for name, factory in BALANCERS.items():
        assert factory().name == name


def test_every_balancer_name_the_config_accepts_exists() -> None:
    from olla.config import BALANCERS as CONFIG_NAMES

    assert set(CONFIG_NAMES) == set(BALANCERS)
