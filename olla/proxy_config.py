"""The `proxy` section: how attempts run, retry, queue for a slot and keep a conversation's slot.

Kept apart from `olla.config`, which calls `parse_proxy` with its `Checks`, so every
problem is reported with the rest of the file's; `olla.config` re-exports the dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from olla.checks import Checks
from olla.values import DURATION_EXPECTED, boolean, choice, duration, integer

BALANCERS = ("slot-aware", "priority", "round-robin", "least-connections")  # names in olla.balancer.BALANCERS


@dataclass(frozen=True)
class RetryConfig:
    enabled: bool = True
    max_attempts: int = 0  # 0: every candidate once


@dataclass(frozen=True)
class QueueConfig:
    max_size: int = 256  # per model; 0: answer 503 at once when every slot is busy
    timeout: float = 30.0


@dataclass(frozen=True)
class AffinityConfig:
    enabled: bool = True
    max_entries: int = 10_000
    ttl: float = 600.0  # idle time after which a conversation is forgotten
    hold: float = 0.1  # a finished turn's slot stays claimed this long for the conversation's next turn


@dataclass(frozen=True)
class ProxyConfig:
    load_balancer: str = "slot-aware"
    connection_timeout: float = 10.0
    response_timeout: float = 900.0
    read_timeout: float = 600.0
    retry: RetryConfig = RetryConfig()
    queue: QueueConfig = QueueConfig()
    affinity: AffinityConfig = AffinityConfig()
    header_timeout: float = 10.0  # routes that take no slot: silence before headers means a stuck endpoint


def parse_proxy(r: Checks, value: Any) -> ProxyConfig:
    d = ProxyConfig()
    keys = ("load_balancer", "connection_timeout", "response_timeout", "read_timeout", "header_timeout", "retry",
            "queue", "affinity")  # fmt: skip
    m = r.mapping(value, "proxy", keys)
    timeout = duration(0, exclusive=True)
    expected = f"{DURATION_EXPECTED}, above zero"
    retry = r.mapping(m.get("retry"), "proxy.retry", ("enabled", "max_attempts"))
    queue = r.mapping(m.get("queue"), "proxy.queue", ("max_size", "timeout"))
    affinity = r.mapping(m.get("affinity"), "proxy.affinity", ("enabled", "max_entries", "ttl", "hold"))
    q, a = QueueConfig(), AffinityConfig()
    return ProxyConfig(
        load_balancer=r.get(
            m, "load_balancer", "proxy", d.load_balancer, choice(BALANCERS), f"one of {', '.join(BALANCERS)}"
        ),
        connection_timeout=r.get(m, "connection_timeout", "proxy", d.connection_timeout, timeout, expected),
        response_timeout=r.get(m, "response_timeout", "proxy", d.response_timeout, timeout, expected),
        read_timeout=r.get(m, "read_timeout", "proxy", d.read_timeout, timeout, expected),
        header_timeout=r.get(m, "header_timeout", "proxy", d.header_timeout, timeout, expected),
        retry=RetryConfig(
            enabled=r.get(retry, "enabled", "proxy.retry", True, boolean, "true or false"),
            max_attempts=r.get(
                retry, "max_attempts", "proxy.retry", 0, integer(0), "an integer >= 0 (0: every candidate once)"
            ),
        ),
        queue=QueueConfig(
            max_size=r.get(queue, "max_size", "proxy.queue", q.max_size, integer(0),
                           "an integer >= 0 (0: no queue, 503 at once)"),
            timeout=r.get(queue, "timeout", "proxy.queue", q.timeout, timeout, expected),
        ),
        affinity=AffinityConfig(
            enabled=r.get(affinity, "enabled", "proxy.affinity", a.enabled, boolean, "true or false"),
            max_entries=r.get(affinity, "max_entries", "proxy.affinity", a.max_entries, integer(1), "an integer >= 1"),
            ttl=r.get(affinity, "ttl", "proxy.affinity", a.ttl, timeout, expected),
            hold=r.get(affinity, "hold", "proxy.affinity", a.hold, duration(0), f"{DURATION_EXPECTED} (0: off)"),
        ),
    )  # fmt: skip
