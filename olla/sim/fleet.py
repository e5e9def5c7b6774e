"""Many emulated llama-servers in one process, each on its own port."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import TracebackType

from olla.sim.config import SimConfig
from olla.sim.server import SimServer


class SimFleet:
    """`async with SimFleet([cfg, ...]) as fleet:` starts them all, then stops them all."""

    def __init__(self, configs: Iterable[SimConfig], host: str = "127.0.0.1") -> None:
        self.servers = [SimServer(config) for config in configs]
        self.host = host

    @property
    def urls(self) -> list[str]:
        return [server.url for server in self.servers]

    async def start(self) -> None:
        results = await asyncio.gather(*(s.start(self.host) for s in self.servers), return_exceptions=True)
        failure = next((r for r in results if isinstance(r, BaseException)), None)
        if failure is not None:
            await self.stop()
            raise failure

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.servers))

    async def __aenter__(self) -> SimFleet:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
