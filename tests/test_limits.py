"""Rate limits: bucket arithmetic on a fake clock, the caller's address, and the 429s a client sees."""

from __future__ import annotations

import ipaddress
import time
from typing import Any

import pytest

from olla.admission_config import DEFAULT_TRUSTED_PROXY_CIDRS, RateLimitConfig
from olla.clients import caller_address
from olla.config import parse_config
from olla.errors import ConfigError
from olla.limits import BucketMap, RateLimiter, TokenBucket, Verdict
from tests.routerkit import chat, ep, fast, post

KEY_A, KEY_B = "sk-team-a-0123456789", "sk-team-b-9876543210"
AUTH = {"api_keys": [{"key": KEY_A, "client": "team-a"}, {"key": KEY_B, "client": "team-b"}]}


def limiter(now: float = 0.0, **limits: Any) -> RateLimiter:
    return RateLimiter(RateLimitConfig(**limits), now)


def admitted(rl: RateLimiter, caller: str, now: float, status: bool = False) -> bool:
    verdict = rl.admit(caller, status, now)
    assert verdict is not None
    return verdict.allowed


# ---- one bucket ---------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    rl = limiter(per_ip_requests_per_minute=6, burst_size=3)  # a token every 10 s
    verdicts = [rl.admit("ip:a", False, 0.0) for _ in range(4)]
    assert [v.allowed for v in verdicts if v] == [True, True, True, False]
    assert [v.remaining for v in verdicts if v] == [2, 1, 0, 0]
    refused = verdicts[3]
    assert refused is not None and (refused.scope, refused.limit, refused.retry_after) == ("client", 6, 10)
    assert refused.reset_after == pytest.approx(30.0)  # three tokens to full
    later = rl.admit("ip:a", False, 4.0)
    assert later is not None and not later.allowed and later.retry_after == 6
    assert admitted(rl, "ip:a", 10.0) and not admitted(rl, "ip:a", 10.0)
    assert [admitted(rl, "ip:a", 40.0) for _ in range(4)] == [True, True, True, False]  # full again, no more


def test_retry_after_rounds_up_and_is_at_least_one_second() -> None:
    rl = limiter(per_ip_requests_per_minute=60, burst_size=1)  # a token a second
    assert admitted(rl, "ip:a", 0.0)
    refused = rl.admit("ip:a", False, 0.5)
    assert refused is not None and refused.retry_after == 1 and not refused.allowed
    refused = rl.admit("ip:a", False, 0.9999)
    assert refused is not None and refused.retry_after == 1
    assert admitted(rl, "ip:a", 1.0)


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    bucket = TokenBucket.full(60, 5, now=0.0)
    bucket.tokens = 0
    bucket.refill(3600.0)
    assert bucket.tokens == 5 and bucket.is_full(3600.0)
    bucket.refill(10.0)  # a clock that goes back changes nothing
    assert bucket.tokens == 5


def test_verdict_headers() -> None:
    refused = Verdict(False, "client", 6, 0, 10, 29.5)
    assert refused.headers(wall_now=1_000.2) == {
        "X-RateLimit-Limit": "6", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "1030", "Retry-After": "10"}
    assert "Retry-After" not in Verdict(True, "global", 60, 4, 0, 1.0).headers(0.0)


# ---- which buckets apply --------------------------------------------------------------------


def test_zero_turns_every_limit_off() -> None:
    rl = limiter()
    assert not rl.enabled
    assert all(rl.admit("ip:a", status, 0.0) is None for status in (False, True) for _ in range(1000))


def test_callers_have_their_own_buckets() -> None:
    rl = limiter(per_ip_requests_per_minute=60, burst_size=2)
    assert admitted(rl, "client:a", 0.0) and admitted(rl, "client:a", 0.0)
    assert not admitted(rl, "client:a", 0.0)
    assert admitted(rl, "client:b", 0.0) and admitted(rl, "ip:10.0.0.1", 0.0)


def test_the_global_bucket_is_shared_and_names_itself() -> None:
    rl = limiter(global_requests_per_minute=60, per_ip_requests_per_minute=600, burst_size=2)
    assert admitted(rl, "client:a", 0.0) and admitted(rl, "client:b", 0.0)
    refused = rl.admit("client:c", False, 0.0)
    assert refused is not None and (refused.allowed, refused.scope, refused.limit) == (False, "global", 60)


def test_a_refused_request_takes_no_token_from_any_bucket() -> None:
    rl = limiter(global_requests_per_minute=60, per_ip_requests_per_minute=60, burst_size=1)
    assert admitted(rl, "client:a", 0.0)
    assert not admitted(rl, "client:b", 0.0)  # the global bucket is empty...
    assert admitted(rl, "client:b", 1.0)  # ...and b's own token was not spent on the refusal


def test_status_routes_have_their_own_budget() -> None:
    rl = limiter(global_requests_per_minute=60, per_ip_requests_per_minute=60, health_requests_per_minute=60,
                 burst_size=1)  # fmt: skip
    assert admitted(rl, "ip:a", 0.0) and not admitted(rl, "ip:a", 0.0)
    status = rl.admit("ip:a", True, 0.0)
    assert status is not None and status.allowed and status.scope == "status"
    assert not admitted(rl, "ip:a", 0.0, status=True)
    assert limiter(per_ip_requests_per_minute=1).admit("ip:a", True, 0.0) is None  # health limit off


def test_the_tightest_bucket_is_reported() -> None:
    rl = limiter(global_requests_per_minute=600, per_ip_requests_per_minute=60, burst_size=5)
    for _ in range(3):
        assert admitted(rl, "client:a", 0.0)
    verdict = rl.admit("client:b", False, 0.0)
    assert verdict is not None and (verdict.scope, verdict.remaining) == ("global", 1)


# ---- memory -------------------------------------------------------------------------------


def test_a_flood_of_callers_keeps_the_map_bounded() -> None:
    buckets = BucketMap(per_minute=60, burst=5, max_size=100)
    for i in range(10_000):
        buckets.get(f"ip:10.{i // 65536}.{i // 256 % 256}.{i % 256}", now=i * 0.0001).tokens -= 1
    assert len(buckets) == 100
    rl = limiter(per_ip_requests_per_minute=60, health_requests_per_minute=60, max_buckets=50)
    for i in range(5_000):
        rl.admit(f"ip:{i}", i % 2 == 0, 0.0)
    assert len(rl.callers) == 50 and len(rl.status) == 50


def test_idle_buckets_are_forgotten_once_full_again() -> None:
    buckets = BucketMap(per_minute=60, burst=2, max_size=100)
    for i in range(10):
        buckets.get(f"ip:{i}", now=0.0).tokens = 0
    assert len(buckets) == 10
    buckets.get("ip:new", now=1.0)  # nobody is full yet
    assert len(buckets) == 11
    buckets.get("ip:new", now=2.5)  # two tokens at a token a second: the first ten are full again
    assert len(buckets) == 1


def test_the_least_recently_used_caller_is_evicted_first() -> None:
    buckets = BucketMap(per_minute=60, burst=2, max_size=2)
    a = buckets.get("a", 0.0)
    a.tokens = 0
    buckets.get("b", 0.0).tokens = 0
    assert buckets.get("a", 0.1) is a  # a is now the most recent
    buckets.get("c", 0.2).tokens = 0
    assert buckets.get("a", 0.3) is a  # b went, not a


# ---- the caller's address ------------------------------------------------------------------

TRUSTED = DEFAULT_TRUSTED_PROXY_CIDRS


@pytest.mark.parametrize(
    ("peer", "forwarded", "trust", "cidrs", "expected"),
    [
        ("127.0.0.1", "203.0.113.7", True, TRUSTED, "203.0.113.7"),  # a trusted proxy says who it is
        ("198.51.100.9", "203.0.113.7", True, TRUSTED, "198.51.100.9"),  # an untrusted peer cannot forge it
        ("127.0.0.1", "203.0.113.7", False, TRUSTED, "127.0.0.1"),  # trust_proxy_headers off
        ("127.0.0.1", "203.0.113.7", True, (), "127.0.0.1"),  # no trusted CIDRs
        ("10.1.2.3", "203.0.113.7, 192.168.0.4", True, TRUSTED, "203.0.113.7"),  # a chain of trusted proxies
        ("10.1.2.3", "1.1.1.1, 203.0.113.7", True, TRUSTED, "203.0.113.7"),  # the client's own spoofed hop is skipped
        ("10.1.2.3", "garbage, 203.0.113.7", True, TRUSTED, "203.0.113.7"),
        ("10.1.2.3", "203.0.113.7, garbage", True, TRUSTED, "10.1.2.3"),
        ("10.1.2.3", "10.0.0.5, 192.168.1.1", True, TRUSTED, "10.0.0.5"),  # all trusted: the leftmost
        ("::ffff:127.0.0.1", "2001:db8::1", True, TRUSTED, "2001:db8::1"),
        ("::1", "[2001:db8::2]", True, TRUSTED, "2001:db8::2"),
        ("127.0.0.1", None, True, TRUSTED, "127.0.0.1"),
        (None, "203.0.113.7", True, TRUSTED, "unknown"),
    ],
)
def test_forwarded_for_is_believed_only_from_trusted_proxies(peer, forwarded, trust, cidrs, expected) -> None:
    assert caller_address(peer, forwarded, trust, tuple(cidrs)) == expected


# ---- config -------------------------------------------------------------------------------


def test_rate_limits_default_to_off() -> None:
    limits = parse_config({}, "test.yaml", {}).server.rate_limits
    assert limits == RateLimitConfig()
    assert (limits.global_requests_per_minute, limits.per_ip_requests_per_minute,
            limits.health_requests_per_minute, limits.burst_size) == (0, 0, 0, 50)  # fmt: skip
    assert not limits.trust_proxy_headers and limits.max_buckets == 10_000
    assert [str(n) for n in limits.trusted_proxy_cidrs] == [
        "127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]


def test_every_rate_limit_key_is_parsed() -> None:
    raw = {"global_requests_per_minute": 1000, "per_ip_requests_per_minute": "${PER_IP}",
           "health_requests_per_minute": 30, "burst_size": 5, "trust_proxy_headers": True,
           "trusted_proxy_cidrs": ["10.0.0.0/8", "fd00::/8", "192.0.2.1"], "max_buckets": 64}  # fmt: skip
    limits = parse_config({"server": {"rate_limits": raw}}, "test.yaml", {"PER_IP": "100"}).server.rate_limits
    assert limits == RateLimitConfig(1000, 100, 30, 5, True, tuple(
        ipaddress.ip_network(n) for n in ("10.0.0.0/8", "fd00::/8", "192.0.2.1/32")), 64)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"per_ip_requests_per_minute": -1}, "server.rate_limits.per_ip_requests_per_minute: out of range: got -1; "
                                             "expected an integer >= 0 (0: off)"),
        ({"global_requests_per_minute": -5}, "server.rate_limits.global_requests_per_minute: out of range: got -5"),
        ({"health_requests_per_minute": 1.5}, "server.rate_limits.health_requests_per_minute: wrong type: got 1.5"),
        ({"burst_size": 0}, "server.rate_limits.burst_size: out of range: got 0; expected an integer >= 1"),
        ({"max_buckets": 0}, "server.rate_limits.max_buckets: out of range: got 0"),
        ({"trust_proxy_headers": "yes"}, "server.rate_limits.trust_proxy_headers: wrong type"),
        ({"trusted_proxy_cidrs": ["10.0.0.0/33"]}, "server.rate_limits.trusted_proxy_cidrs[0]: not a CIDR: "
                                                   "got '10.0.0.0/33'; expected a CIDR such as 10.0.0.0/8"),
        ({"trusted_proxy_cidrs": ["10.0.0.0/8", "localhost"]}, "trusted_proxy_cidrs[1]: not a CIDR: got 'localhost'"),
        ({"trusted_proxy_cidrs": "10.0.0.0/8"}, "server.rate_limits.trusted_proxy_cidrs: wrong type"),
        ({"per_endpoint": {}}, "server.rate_limits.per_endpoint: unknown key"),
    ],
)
def test_bad_rate_limits(raw: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"server": {"rate_limits": raw}}, "test.yaml", {})
    (problem,) = caught.value.problems
    assert problem.startswith("test.yaml: ") and fragment in problem, problem


# ---- the router ---------------------------------------------------------------------------


async def test_429_on_a_proxied_route_with_its_headers(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"rate_limits": {"per_ip_requests_per_minute": 6,
                                                                      "burst_size": 2}})  # fmt: skip
    first = await post(client, chat())
    assert first.status == 200
    assert (first.headers["X-RateLimit-Limit"], first.headers["X-RateLimit-Remaining"]) == ("6", "1")
    assert int(first.headers["X-RateLimit-Reset"]) >= int(time.time())
    assert (await post(client, chat())).status == 200
    r = await post(client, chat(), headers={"X-Request-Id": "req-429"})
    assert r.status == 429
    body = await r.json()
    assert body["error"]["code"] == "rate_limit_exceeded" and body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"].startswith("Rate limit reached for your address: 6 requests per minute.")
    assert r.headers["X-Olla-Request-Id"] == "req-429"
    assert 9 <= int(r.headers["Retry-After"]) <= 10
    assert (r.headers["X-RateLimit-Limit"], r.headers["X-RateLimit-Remaining"]) == ("6", "0")
    assert int(time.time()) + 9 <= int(r.headers["X-RateLimit-Reset"]) <= int(time.time()) + 21
    assert "X-Olla-Endpoint" not in r.headers


async def test_a_streamed_answer_carries_the_rate_limit_headers(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"rate_limits": {"global_requests_per_minute": 60,
                                                                      "burst_size": 5}})  # fmt: skip
    streamed = await post(client, chat(stream=True))
    assert streamed.status == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
    assert (streamed.headers["X-RateLimit-Limit"], streamed.headers["X-RateLimit-Remaining"]) == ("60", "4")


async def test_429_on_a_status_route_with_its_own_budget(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"rate_limits": {
        "per_ip_requests_per_minute": 60, "health_requests_per_minute": 1, "burst_size": 1}})  # fmt: skip
    assert (await client.get("/internal/health")).status == 200
    r = await client.get("/metrics")
    assert r.status == 429 and (await r.json())["error"]["code"] == "rate_limit_exceeded"
    assert r.headers["X-RateLimit-Limit"] == "1" and r.headers["Retry-After"] == "60"
    assert "X-Olla-Request-Id" in r.headers
    assert (await r.json())["error"]["message"].startswith("Rate limit reached for status requests from your address")
    assert (await post(client, chat())).status == 200  # the API budget is untouched


async def test_one_client_limited_another_not(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"auth": AUTH, "rate_limits": {
        "per_ip_requests_per_minute": 1, "burst_size": 2}})  # fmt: skip
    a_key, b_key = {"Authorization": f"Bearer {KEY_A}"}, {"X-Api-Key": KEY_B}
    assert [(await post(client, chat(), headers=a_key)).status for _ in range(3)] == [200, 200, 429]
    refused = await post(client, chat(), headers=a_key)
    assert (await refused.json())["error"]["message"].startswith("Rate limit reached for client team-a:")
    assert [(await post(client, chat(), headers=b_key)).status for _ in range(2)] == [200, 200]
    metrics = await (await client.get("/metrics", headers=b_key)).text()
    assert 'olla_rate_limited_total{client="team-a",scope="client"} 2.0' in metrics
    assert 'olla_client_requests_total{client="team-a",code="429",route="other"} 2.0' in metrics
    assert KEY_A not in metrics and KEY_B not in metrics


async def test_the_global_limit_refuses_every_caller(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"auth": AUTH, "rate_limits": {
        "global_requests_per_minute": 1, "burst_size": 1}})  # fmt: skip
    assert (await post(client, chat(), headers={"X-Api-Key": KEY_A})).status == 200
    r = await post(client, chat(), headers={"X-Api-Key": KEY_B})
    assert r.status == 429 and (await r.json())["error"]["message"].startswith("Rate limit reached for all callers")


async def test_unauthenticated_requests_are_refused_before_they_cost_a_token(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    client = await make_router([ep("a", a)], server={"auth": AUTH, "rate_limits": {
        "global_requests_per_minute": 1, "burst_size": 1}})  # fmt: skip
    assert [(await post(client, chat())).status for _ in range(3)] == [401] * 3
    assert (await post(client, chat(), headers={"X-Api-Key": KEY_A})).status == 200


async def test_forwarded_for_is_believed_only_from_trusted_cidrs(start_sims, make_router) -> None:
    (a,) = await start_sims(fast())
    limits = {"per_ip_requests_per_minute": 1, "burst_size": 1, "trust_proxy_headers": True}
    trusting = await make_router([ep("a", a)],
                                 server={"rate_limits": {**limits, "trusted_proxy_cidrs": ["127.0.0.0/8"]}})  # fmt: skip
    one, two = {"X-Forwarded-For": "203.0.113.1"}, {"X-Forwarded-For": "203.0.113.2"}
    assert (await post(trusting, chat(), headers=one)).status == 200
    assert (await post(trusting, chat(), headers=two)).status == 200  # another caller behind the proxy
    assert (await post(trusting, chat(), headers=one)).status == 429
    wary = await make_router([ep("a", a)], server={"rate_limits": {**limits, "trusted_proxy_cidrs": ["10.0.0.0/8"]}})
    assert (await post(wary, chat(), headers=one)).status == 200
    assert (await post(wary, chat(), headers=two)).status == 429  # the header is ignored: one caller, 127.0.0.1


async def test_default_limits_never_throttle_a_benchmark(start_sims, make_router) -> None:
    (a,) = await start_sims(fast(slots=8))
    client = await make_router([ep("a", a)])
    statuses = {(await client.get("/olla/llamacpp/v1/models")).status for _ in range(300)}
    assert statuses == {200}
    assert "X-RateLimit-Limit" not in (await post(client, chat())).headers
