"""Emulated llama-servers for tests: starting and stopping them, a client session for them, waiting on a state.

The fixtures `start_sim`, `start_sims` and `sim_session` in tests/conftest.py are built from these.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from olla.sim import SimConfig, SimServer

StartSim = Callable[..., Awaitable[SimServer]]
StartSims = Callable[..., Awaitable[list[SimServer]]]

# What `start_sim()` runs unless told otherwise: one chat model, no prefill, a token a millisecond.
SIM_DEFAULTS: dict[str, Any] = {"model": "chat-model", "prefill_ms": 0.0, "decode_ms": 1.0}


def sim_config(**overrides: Any) -> SimConfig:
    """A SimConfig of SIM_DEFAULTS with `overrides` on top."""
    return SimConfig(**{**SIM_DEFAULTS, **overrides})


class SimServers:
    """Servers started through `start` or `start_one`, all stopped, in the order started, by `stop`."""

    def __init__(self) -> None:
        self.started: list[SimServer] = []

    async def start(self, *configs: SimConfig) -> list[SimServer]:
        servers = [SimServer(c) for c in configs]
        for sim in servers:
            await sim.start(host="127.0.0.1", port=0)
            self.started.append(sim)
        return servers

    async def start_one(self, **overrides: Any) -> SimServer:
        (sim,) = await self.start(sim_config(**overrides))
        return sim

    async def stop(self) -> None:
        for sim in self.started:
            await sim.stop()


def sim_client() -> aiohttp.ClientSession:
    # A fresh connection per request: like llama-server, the emulator hangs up after each stream.
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))


async def until(predicate: Callable[[], bool], timeout: float = 2.0) -> float:
    """Seconds until `predicate()` holds; fails the test after `timeout`."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        await asyncio.sleep(0.002)
    return time.monotonic() - started
