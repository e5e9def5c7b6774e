"""The probe, discovery and /slots loops end when cancelled, even as something wakes them.

Shutdown and reload cancel these loops and wait for them. On Python 3.11 a cancel
that lands in the same turn of the event loop as a wake-up (a recovered endpoint
asking for discovery, requests asking for a probe) was lost by `asyncio.wait_for`,
and the loop then slept out its whole interval (300 s for discovery) while the
router's shutdown waited for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, cast

import pytest

from olla import discovery
from olla.config import EndpointConfig
from olla.registry import Registry, pause


async def woken_and_cancelled(loop: Coroutine[Any, Any, None], wake: asyncio.Event) -> asyncio.Task[None]:
    task = asyncio.create_task(loop)
    for _ in range(3):  # turns of the event loop, not time: the loop gets into its wait
        await asyncio.sleep(0)
    wake.set()
    task.cancel()
    return task


async def test_a_pause_cancelled_as_it_is_woken_ends_cancelled() -> None:
    wake = asyncio.Event()
    task = await woken_and_cancelled(pause(300.0, 0.0, wake), wake)
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):
            await task


async def test_a_discovery_loop_cancelled_as_it_is_woken_ends_cancelled() -> None:
    registry = Registry([EndpointConfig(name="a", url="http://a:1")])
    endpoint = registry.endpoints["a"]
    # Never used: a loop that ends at the cancel never discovers.
    upstream, profile = cast(Any, None), cast(Any, None)
    loop = discovery.run(registry, upstream, endpoint, profile, interval=300.0)
    task = await woken_and_cancelled(loop, registry.discovery_event(endpoint))
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(1.0):
            await task
