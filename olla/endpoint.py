"""One llama.cpp server from the registry: its configuration and live state.

State changes are pure methods that take the time from the caller:

    unknown ──probe ok──▶ healthy ◀──probe ok── loading | offline | unhealthy | misconfigured
       │                    │        (back in after 2 good probes in a row)
       │                    └─ failed attempt (breaker) ─▶ offline | unhealthy
       └─probe 503 Loading─▶ loading      probe refused/timeout ─▶ offline
                                          probe 401/403 ─▶ misconfigured   other ─▶ unhealthy

Only a healthy endpoint is routable. A breaker ejection lasts until the next
good probe.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from olla.config import EndpointConfig
from olla.slots import Slots

OFFLINE_BACKOFF_CAP = 30.0
LOADING_RECHECK = 1.0  # also the pace of the checks that bring an endpoint back
RECOVERY_PROBES = 2
SPEED_WEIGHT = 0.2  # of the newest measurement in the moving averages
TYPICAL_TOKENS = 64  # a reply length, to weigh time to first byte against tokens per second


class Health(enum.StrEnum):
    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    LOADING = "loading"
    OFFLINE = "offline"
    UNHEALTHY = "unhealthy"
    MISCONFIGURED = "misconfigured"


class Outcome(enum.Enum):
    """What one attempt against an endpoint taught the breaker."""

    OK = "ok"
    UNREACHABLE = "unreachable"  # refused, reset, or timed out before headers
    REJECTED = "rejected"  # answered 502/503/504 before any byte
    BROKEN = "broken"  # the stream broke after bytes went out


@dataclass(frozen=True)
class Probe:
    """The result of one active health check."""

    health: Health
    latency: float
    detail: str = ""


@dataclass(frozen=True)
class Discovery:
    """What an endpoint said about itself through /v1/models and /props."""

    models: tuple[str, ...]  # the id first, then the aliases
    n_ctx: int | None = None
    n_ctx_train: int | None = None
    total_slots: int | None = None
    model_path: str | None = None
    size: int | None = None
    n_params: int | None = None


@dataclass(eq=False)
class Endpoint:
    config: EndpointConfig
    health: Health = Health.UNKNOWN
    detail: str = ""
    discovery: Discovery | None = None
    discovered_at: float | None = None
    last_check: float | None = None
    last_latency: float | None = None
    probe_failures: int = 0
    good_probes: int = 0  # in a row
    breaker_failures: int = 0
    answered_at: float = -math.inf  # when a request last ended well
    in_flight: int = 0
    requests: int = 0
    errors: int = 0
    slots: Slots = field(default_factory=Slots)
    ttfb: float | None = None  # moving average, seconds
    tokens_per_second: float | None = None  # moving average over streamed replies
    _served: frozenset[str] = field(default_factory=frozenset, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def routable(self) -> bool:
        return self.health is Health.HEALTHY

    @property
    def served(self) -> frozenset[str]:
        """Every name this endpoint answers to: ids, aliases and the file name of a path id."""
        return self._served

    def record_speed(self, ttfb: float, tokens_per_second: float | None) -> None:
        self.ttfb = ttfb if self.ttfb is None else self.ttfb + SPEED_WEIGHT * (ttfb - self.ttfb)
        if tokens_per_second:
            old = self.tokens_per_second
            self.tokens_per_second = tokens_per_second if old is None else old + SPEED_WEIGHT * (tokens_per_second - old)

    def pace(self) -> float:
        """Expected seconds for a typical reply from recent measurements; 0 while unmeasured, so new ones get tried."""
        seconds = self.ttfb or 0.0
        if self.tokens_per_second:
            seconds += TYPICAL_TOKENS / self.tokens_per_second
        return seconds

    def record_probe(self, probe: Probe, now: float) -> bool:
        """Apply one probe; True when the endpoint has just become healthy (a recovery).

        An endpoint that was out of rotation comes back only after RECOVERY_PROBES
        good probes in a row, so a flapping one does not bounce in and out; one
        starting up (unknown) is healthy at its first good probe.
        """
        was = self.health
        self.last_check = now
        self.last_latency = probe.latency
        if probe.health is not Health.HEALTHY:
            self.good_probes = 0
            self.detail = probe.detail
            self.health = probe.health
            if probe.health is not Health.LOADING:
                self.probe_failures += 1
            return False
        self.good_probes += 1
        if was in (Health.HEALTHY, Health.UNKNOWN) or self.good_probes >= RECOVERY_PROBES:
            self.health = Health.HEALTHY
            self.detail = ""
            self.probe_failures = 0
            self.breaker_failures = 0
        else:
            self.detail = f"recovering: {self.good_probes} of {RECOVERY_PROBES} good checks"
        return self.health is Health.HEALTHY and was is not Health.HEALTHY

    def next_probe_in(self) -> float:
        """Seconds until the next probe: sooner while loading or recovering, backing off while offline."""
        interval = self.config.check_interval
        if self.health is Health.LOADING or (self.good_probes and not self.routable):
            return min(interval, LOADING_RECHECK)
        if self.health is Health.OFFLINE and self.probe_failures > 1:
            backoff: float = interval * 2.0 ** (self.probe_failures - 1)
            return min(backoff, max(interval, OFFLINE_BACKOFF_CAP))
        return interval

    def record_discovery(self, discovery: Discovery, now: float) -> None:
        self.discovery = discovery
        self.discovered_at = now
        self.slots.reported = discovery.total_slots
        names = set(discovery.models)
        names.update(base_name(m) for m in discovery.models)
        if discovery.model_path:
            names.add(base_name(discovery.model_path))
        self._served = frozenset(names)

    def record_outcome(
        self, outcome: Outcome, detail: str = "", now: float = 0.0, since: float | None = None, conclusive: bool = True
    ) -> bool:
        """Feed the passive breaker; True when this attempt ejected the endpoint.

        `since`: the failure tells of the endpoint as it was then (a timeout, at
        its attempt's start); a request that ended well after that is newer news,
        so the failure counts but does not eject. Not `conclusive`: the attempt
        had too little time to tell anything of the endpoint, so it counts but
        never ejects.
        """
        if outcome is Outcome.OK:
            self.breaker_failures = 0
            self.answered_at = max(self.answered_at, now)
            return False
        self.errors += 1
        self.breaker_failures += 1
        if not self.routable or not conclusive or (since is not None and since < self.answered_at):
            return False
        self.health = Health.OFFLINE if outcome is Outcome.UNREACHABLE else Health.UNHEALTHY
        self.detail = f"breaker: {detail}" if detail else "breaker"
        return True

    def url_for(self, configured: str | None, path: str) -> str:
        """A configured absolute URL as is; a path (configured or the profile's) joined to the endpoint's url."""
        target = configured or path
        if target.startswith(("http://", "https://")):
            return target
        return self.config.url.rstrip("/") + "/" + target.lstrip("/")

    def serves(self, model: str) -> bool:
        return model in self._served or base_name(model) in self._served


def base_name(model: str) -> str:
    """`/models/llama-8b.gguf` and `llama-8b.gguf` name the same file."""
    return model.rsplit("/", 1)[-1]
