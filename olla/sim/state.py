"""The runtime state of one emulated server, shared by its handlers."""

from __future__ import annotations

import asyncio
import random
import string
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from olla.sim.config import SimConfig
from olla.sim.engine import Engine
from olla.sim.faults import Fault


@dataclass
class State:
    config: SimConfig
    engine: Engine
    faults: dict[str, Fault] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ready_at: float = 0.0
    media_marker: str = ""
    # Connections with a request in progress, which `refuse` lets finish.
    active: set[asyncio.BaseTransport] = field(default_factory=set)

    def __post_init__(self) -> None:
        rng = random.Random(self.config.seed)
        marker = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(32))
        self.media_marker = f"<__media_{marker}__>"

    def begin_loading(self) -> None:
        self.ready_at = self.engine.clock() + self.config.load_seconds

    @property
    def loading(self) -> bool:
        return "loading" in self.faults or self.engine.clock() < self.ready_at


STATE = web.AppKey("sim_state", State)


def json_response(body: Any, status: int = 200) -> web.Response:
    response = web.Response(body=orjson.dumps(body), status=status, content_type="application/json", charset="utf-8")
    if status >= 400:
        # llama-server closes the connection after every error reply.
        response.force_close()
    return response
