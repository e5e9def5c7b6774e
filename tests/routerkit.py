"""Building routers for tests: a config around given endpoints, requests to it, and waiting on registry changes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import BaseTestServer, TestClient
from yarl import URL

from olla.app import App
from olla.config import Config, parse_config
from olla.registry import Registry
from olla.server import HEAD_TIMEOUT, Server
from olla.sim import SimConfig, SimServer

CHAT = "chat-model"


def ep(name: str, sim: SimServer, priority: int = 100, **extra: Any) -> dict[str, Any]:
    return {"name": name, "url": sim.url, "priority": priority, **extra}


def fast(model: str = CHAT, **kw: Any) -> SimConfig:
    return SimConfig(model=model, **{"slots": 2, "prefill_ms": 0.0, "decode_ms": 1.0, **kw})


def chat(model: str = CHAT, tokens: int = 3, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens, **extra}


async def post(client: TestClient, body: Any, path: str = "/olla/llamacpp/v1/chat/completions",
               **kw: Any) -> aiohttp.ClientResponse:  # fmt: skip
    response = await client.post(path, json=body, **kw)
    await response.read()
    return response


class RouterServer(BaseTestServer):
    """An olla app served as `olla serve` serves it, for aiohttp's test client: `aiohttp_client(RouterServer(app))`."""

    def __init__(self, app: App, head_timeout: float = HEAD_TIMEOUT, **kw: Any) -> None:
        super().__init__(**kw)
        self.app = app
        self.head_timeout = head_timeout
        self.server: Server | None = None

    async def start_server(self, loop: asyncio.AbstractEventLoop | None = None, **kw: Any) -> None:
        if self.server is not None:
            return
        self.server = await self.app.serve(self.host, 0, shutdown_timeout=1.0, head_timeout=self.head_timeout)
        self.port, self.scheme = self.server.port, "http"
        self._root = URL(f"http://{self.host}:{self.port}")

    async def _make_runner(self, **kw: Any) -> Any:
        raise NotImplementedError("olla serves itself; there is no aiohttp runner")

    @property
    def started(self) -> bool:
        return self.server is not None

    async def close(self) -> None:
        if self.server is not None and not self._closed:
            self._closed = True
            await self.app.stop(self.server)


def router_config(endpoints: list[dict[str, Any]], env: dict[str, str] | None = None, **sections: Any) -> Config:
    """A config whose endpoints are checked often, so tests see state changes quickly.

    `env` replaces the process environment for `${VAR}` and OPENAI_API_KEYS, so a developer's
    exported variables never change a test's router.
    """
    full = [{"type": "llamacpp", "check_interval": "200ms", "check_timeout": "150ms", **e} for e in endpoints]
    raw: dict[str, Any] = {"discovery": {"static": {"endpoints": full}}, "logging": {"level": "warning"}}
    raw["discovery"].update(sections.pop("discovery", {}))
    raw.update(sections)
    return parse_config(raw, "<test>", env=env or {})


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


async def fake_endpoint(aiohttp_server: Any, tokenize: Callable[[web.Request], Any]) -> str:
    """A minimal llama-server look-alike serving CHAT: health, models, and `tokenize` as given; its URL."""

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": CHAT}]})

    fake = web.Application()
    fake.router.add_get("/health", health)
    fake.router.add_get("/v1/models", models)
    fake.router.add_post("/tokenize", tokenize)
    server = await aiohttp_server(fake)
    return str(server.make_url("/")).rstrip("/")
