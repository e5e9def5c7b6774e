"""Rate limits: token buckets, a bounded map of them per caller, and the limiter that consults them.

Pure: every call takes `now` (monotonic seconds) from the caller, so tests are
plain function calls. A bucket holds up to `burst_size` tokens and gains
`requests_per_minute / 60` a second; a request takes one. There are three kinds:

- global: one bucket for every request outside the status routes;
- caller: one per client (by key) or, for a request without one, per IP address;
- status: one per caller for the status routes, their own budget.

A limit of 0 turns its kind off. Per-caller maps are bounded: a bucket that has
refilled completely is the same as a new one, so it is forgotten once idle, and
past `max_buckets` the least recently used goes first. A flood of addresses
therefore costs at most `max_buckets` small entries per map.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from olla.admission_config import RateLimitConfig

GLOBAL, CALLER, STATUS = "global", "client", "status"  # the `scope` of a verdict


@dataclass
class TokenBucket:
    rate: float  # tokens a second
    capacity: float
    tokens: float
    updated: float

    @classmethod
    def full(cls, per_minute: int, burst: int, now: float) -> TokenBucket:
        return cls(per_minute / 60.0, float(burst), float(burst), now)

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def wait(self) -> float:
        """Seconds until one token is there (0 when one is)."""
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def until_full(self) -> float:
        return (self.capacity - self.tokens) / self.rate

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.updated) * self.rate >= self.capacity


@dataclass(frozen=True)
class Verdict:
    """What one bucket says of one request: the refusing bucket, or the tightest that admitted it."""

    allowed: bool
    scope: str  # GLOBAL, CALLER or STATUS
    limit: int  # requests per minute
    remaining: int  # requests that could be sent at once now
    retry_after: int  # whole seconds until a request would be admitted; 0 when allowed
    reset_after: float  # seconds until the bucket is full again

    def headers(self, wall_now: float) -> dict[str, str]:
        """X-RateLimit-* (Reset is Unix time, as Olla and GitHub send it), and Retry-After when refused."""
        headers = {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(math.ceil(wall_now + self.reset_after)),
        }
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after)
        return headers


class BucketMap:
    """Buckets by caller, at most `max_size`; full (idle) buckets and then the least recently used are forgotten."""

    def __init__(self, per_minute: int, burst: int, max_size: int) -> None:
        self.per_minute, self.burst, self.max_size = per_minute, burst, max_size
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def get(self, caller: str, now: float) -> TokenBucket:
        self._forget_idle(now)
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.max_size:
                self._buckets.popitem(last=False)
            bucket = self._buckets[caller] = TokenBucket.full(self.per_minute, self.burst, now)
        else:
            self._buckets.move_to_end(caller)
        return bucket

    def _forget_idle(self, now: float) -> None:
        # Oldest first: stop at the first bucket still refilling; amortised O(1) a request.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if not oldest.is_full(now):
                return
            self._buckets.popitem(last=False)


class RateLimiter:
    def __init__(self, config: RateLimitConfig, now: float) -> None:
        c = config
        self.global_limit = c.global_requests_per_minute
        self.caller_limit = c.per_ip_requests_per_minute
        self.status_limit = c.health_requests_per_minute
        self.global_bucket = TokenBucket.full(self.global_limit, c.burst_size, now) if self.global_limit else None
        self.callers = BucketMap(c.per_ip_requests_per_minute, c.burst_size, c.max_buckets)
        self.status = BucketMap(c.health_requests_per_minute, c.burst_size, c.max_buckets)

    @property
    def enabled(self) -> bool:
        return bool(self.global_limit or self.caller_limit or self.status_limit)

    def admit(self, caller: str, status_route: bool, now: float) -> Verdict | None:
        """Take a token from every bucket that applies, or from none when one is empty; None when none applies."""
        buckets: list[tuple[str, int, TokenBucket]] = []
        if status_route:
            if self.status_limit:
                buckets.append((STATUS, self.status_limit, self.status.get(caller, now)))
        else:
            if self.caller_limit:
                buckets.append((CALLER, self.caller_limit, self.callers.get(caller, now)))
            if self.global_bucket is not None:
                buckets.append((GLOBAL, self.global_limit, self.global_bucket))
        if not buckets:
            return None
        for _, _, bucket in buckets:
            bucket.refill(now)
        empty = [b for b in buckets if b[2].tokens < 1]
        if empty:
            scope, limit, bucket = max(empty, key=lambda b: b[2].wait())
            retry_after = max(1, math.ceil(bucket.wait() - 1e-9))  # not 2s for a float's 1.0000000001
            return Verdict(False, scope, limit, 0, retry_after, bucket.until_full())
        for _, _, bucket in buckets:
            bucket.tokens -= 1
        scope, limit, bucket = min(buckets, key=lambda b: b[2].tokens)
        return Verdict(True, scope, limit, math.floor(bucket.tokens), 0, bucket.until_full())
