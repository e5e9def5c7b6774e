"""`create_app(config)`: app keys, cleanup contexts, middlewares and routes; the only wiring.

`reload(app, path)` applies a config file to the running app (SIGHUP in `olla
serve`): a new config is built and swapped in, never the old one changed.
Endpoints are matched by name (`Registry.replace`): an unchanged one keeps its
state and its loops, a removed one leaves the pools and its loops stop while
requests in flight on it finish, an added one is probed and discovered at once.
Requests that start after the swap follow the new proxy settings, aliases and
server limits. `server.host`, `server.port` and the profiles need a restart; a
reload that changes them says so in a warning and keeps the running ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from olla import admission, discovery, health
from olla.admission import Admission
from olla.balancer import BALANCERS
from olla.config import Config, load_config
from olla.endpoint import Endpoint
from olla.errors import ConfigError
from olla.exchange import Traffic
from olla.exchange import middleware as exchange_middleware
from olla.http1 import Client
from olla.metrics import Metrics
from olla.proxy import Proxy
from olla.registry import Registry
from olla.slotqueue import SlotQueue
from olla.status import LoadedConfig, Status
from olla.upstream import KEEPALIVE, Upstream

log = logging.getLogger("olla.config")

CONFIG = web.AppKey("config", LoadedConfig)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
PROXY = web.AppKey("proxy", Proxy)
QUEUE = web.AppKey("queue", SlotQueue)
ADMISSION = web.AppKey("admission", Admission)
TRAFFIC = web.AppKey("traffic", Traffic)
HEALTH_PATH = "/internal/health"  # always open: probes carry no key


class Monitors:
    """Each endpoint's probe loop, discovery and slot reconciliation, started and stopped as endpoints come and go."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        self.registry = registry
        self.metrics = metrics
        self.tasks: dict[Endpoint, list[asyncio.Task[None]]] = {}
        self._stopping: list[asyncio.Task[None]] = []

    def start(self, endpoint: Endpoint, config: Config, upstream: Upstream) -> None:
        registry, profile, every = self.registry, config.profiles[endpoint.config.type], config.discovery
        self.tasks[endpoint] = [
            asyncio.create_task(health.run(registry, upstream, endpoint, profile, self.metrics)),
            asyncio.create_task(discovery.run(registry, upstream, endpoint, profile, every.model_discovery_interval)),
            asyncio.create_task(discovery.run_slots(registry, upstream, endpoint, profile, every.slots_interval)),
        ]

    def stop(self, endpoint: Endpoint) -> None:
        """Cancel the endpoint's loops; `stopped()` waits until they have ended."""
        for task in self.tasks.pop(endpoint, ()):
            task.cancel()
            self._stopping.append(task)

    async def stopped(self) -> None:
        stopping, self._stopping = self._stopping, []
        await asyncio.gather(*stopping, return_exceptions=True)


MONITORS = web.AppKey("monitors", Monitors)


def create_app(config: Config) -> web.Application:
    metrics = Metrics()
    default_slots = {name: profile.default_slots for name, profile in config.profiles.items()}
    registry = Registry(config.discovery.endpoints, config.model_aliases, default_slots)
    metrics.declare(e.name for e in registry)
    balancer = BALANCERS[config.proxy.load_balancer]()
    queue = SlotQueue(balancer, config.proxy.queue.max_size, config.proxy.queue.timeout, metrics,
                      config.proxy.affinity.hold)  # fmt: skip
    registry.listeners.append(queue.wake)
    queue.recount = registry.recount
    loaded = LoadedConfig(config)
    status = Status(registry, metrics, queue, loaded)
    # Status routes need a key only with server.auth.protect_status, and have their own rate budget.
    status_routes = {"/internal/status": status.status, "/internal/status/endpoints": status.endpoints,
                     "/internal/status/models": status.status_models, "/metrics": status.prometheus}  # fmt: skip
    gate = Admission(config.server, metrics, frozenset({HEALTH_PATH}), frozenset(status_routes))
    traffic = Traffic()
    # Outermost first: the exchange middleware renders and logs what admission refuses (CORS → auth → rate limit).
    # Bodies are read and limited by the proxy itself, which answers 413 in OpenAI's shape.
    app = web.Application(
        middlewares=[exchange_middleware(metrics, traffic), admission.middleware(gate)],
        client_max_size=config.server.max_body_size,
    )
    app.on_response_prepare.append(gate.on_prepare)
    app[CONFIG] = loaded
    app[ADMISSION] = gate
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[QUEUE] = queue
    app[TRAFFIC] = traffic
    app[MONITORS] = Monitors(registry, metrics)

    app.cleanup_ctx.append(_proxy)
    app.cleanup_ctx.append(_monitors)

    routes = app.router
    for profile in config.profiles.values():
        for prefix in profile.prefixes:
            routes.add_get(f"/olla/{prefix}{profile.models_path}", status.openai_models, allow_head=False)
            routes.add_route("*", f"/olla/{prefix}/{{tail:.*}}", _proxied(app, profile))
    routes.add_get("/olla/models", status.models)
    routes.add_get(HEALTH_PATH, status.health)
    for path, handler in status_routes.items():
        routes.add_get(path, handler)
    return app


def _proxied(app: web.Application, profile):  # type: ignore[no-untyped-def]
    async def handle(request: web.Request) -> web.StreamResponse:
        return await app[PROXY].handle(request, profile)

    return handle


async def _proxy(app: web.Application) -> AsyncIterator[None]:
    client = Client(KEEPALIVE)
    config = app[CONFIG].config
    app[PROXY] = Proxy(config, app[REGISTRY], Upstream(client, config.proxy), app[METRICS], app[QUEUE])
    yield
    client.close()


async def _monitors(app: web.Application) -> AsyncIterator[None]:
    monitors = app[MONITORS]
    for endpoint in app[REGISTRY]:
        monitors.start(endpoint, app[CONFIG].config, app[PROXY].upstream)
    yield
    for endpoint in list(monitors.tasks):
        monitors.stop(endpoint)
    await monitors.stopped()


# ---- reload ------------------------------------------------------------------------------

# Read once at startup: a reload that changes them warns and keeps the running values.
NEEDS_RESTART: dict[str, Callable[[Config], object]] = {
    "server.host": lambda c: c.server.host,
    "server.port": lambda c: c.server.port,
    "profiles_dir": lambda c: c.profiles,
}


async def reload(app: web.Application, path: str | Path) -> bool:
    """Load the config file and apply it; True when applied. A refused file leaves the running config serving."""
    try:
        apply(app, load_config(path))
    except ConfigError as exc:
        app[CONFIG].refused(exc.problems)
        log.error("config reload refused; the running config keeps serving",
                  extra={"source": str(path), "problems": exc.problems})  # fmt: skip
        return False
    await app[MONITORS].stopped()
    return True


def apply(app: web.Application, config: Config) -> None:
    """Swap a new config in (see the module docstring); raises ConfigError when it cannot apply without a restart."""
    loaded, registry, proxy, monitors = app[CONFIG], app[REGISTRY], app[PROXY], app[MONITORS]
    running = loaded.config
    loaded_types = ", ".join(sorted(running.profiles))
    unknown = [f"{config.source}: discovery.static.endpoints[{i}].type: not a profile olla loaded at startup (a new "
               f"profile needs a restart): got {c.type!r}; expected one of {loaded_types}"
               for i, c in enumerate(config.discovery.endpoints) if c.type not in running.profiles]  # fmt: skip
    if unknown:
        raise ConfigError(unknown)
    restart = [key for key, read in NEEDS_RESTART.items() if read(config) != read(running)]
    server = dataclasses.replace(config.server, host=running.server.host, port=running.server.port)
    config = dataclasses.replace(config, server=server, profiles=running.profiles)

    change = registry.replace(config.discovery.endpoints, config.model_aliases)
    names = change.names()
    app[METRICS].declare(names["added"])
    proxy.configure(config)
    app[ADMISSION].reconfigure(config.server)
    intervals = (config.discovery.model_discovery_interval, config.discovery.slots_interval)
    restart_all = intervals != (running.discovery.model_discovery_interval, running.discovery.slots_interval)
    for endpoint in list(monitors.tasks) if restart_all else change.removed:
        monitors.stop(endpoint)
    for endpoint in list(registry) if restart_all else change.added:
        monitors.start(endpoint, config, proxy.upstream)
    app[QUEUE].follow(list(registry), [e for e in change.removed if e.name in names["removed"]])
    loaded.swap(config)
    log.info("config reloaded", extra={"source": config.source, "sha256": config.sha256, **names})
    if restart:
        log.warning("config keys changed that take effect only after a restart", extra={"keys": restart})
