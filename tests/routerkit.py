"""Building routers for tests: a config around given endpoint URLs, and waiting on registry changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from olla.config import Config, parse_config
from olla.registry import Registry


def router_config(endpoints: list[dict[str, Any]], **sections: Any) -> Config:
    """A config whose endpoints are checked often, so tests see state changes quickly."""
    full = [{"type": "llamacpp", "check_interval": "200ms", "check_timeout": "150ms", **e} for e in endpoints]
    raw: dict[str, Any] = {"discovery": {"static": {"endpoints": full}}, "logging": {"level": "warning"}}
    raw.update(sections)
    return parse_config(raw, "<test>")


async def wait_until(registry: Registry, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait for a registry state without polling: every health or discovery change wakes the check."""
    deadline = time.monotonic() + timeout
    while True:
        changed = registry.changed
        if predicate():
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            states = {e.name: (e.health.value, e.detail) for e in registry}
            raise TimeoutError(f"registry state not reached in {timeout}s: {states}")
        try:
            await asyncio.wait_for(changed.wait(), remaining)
        except TimeoutError:
            pass
