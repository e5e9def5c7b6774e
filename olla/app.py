"""`create_app(config)`: the router's parts and its routes; the only wiring.

Every request enters through `App.front` (olla.exchange), which calls
`App.dispatch`: admission, then one of olla's own routes (status, models,
health, metrics), or a profile's prefix, whose requests the proxy forwards.
Paths are matched as sent, percent-escapes and all.

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
from collections.abc import Awaitable, Callable
from pathlib import Path

from olla import discovery, health
from olla.admission import Admission
from olla.balancer import BALANCERS
from olla.config import Config, load_config
from olla.endpoint import Endpoint
from olla.errors import ConfigError, MethodNotAllowed, RouteNotFound
from olla.exchange import Answer, Exchange, Front, Traffic
from olla.http1 import Client
from olla.messages import Request, Response
from olla.metrics import Metrics
from olla.profiles import Profile
from olla.proxy import Proxy
from olla.registry import Registry
from olla.server import HEAD_TIMEOUT, Server
from olla.slotqueue import SlotQueue
from olla.status import LoadedConfig, Status
from olla.upstream import KEEPALIVE, Upstream

log = logging.getLogger("olla.config")

HEALTH_PATH = "/internal/health"  # always open: probes carry no key
OPEN, STATUS, OTHER = "open", "status", "other"  # what a route needs from admission (see olla.admission)
GET = frozenset({"GET", "HEAD"})


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


@dataclasses.dataclass(frozen=True)
class Route:
    """A route olla answers itself: its handler, methods and what admission asks of it."""

    handler: Callable[[Request], Awaitable[Response]]
    methods: frozenset[str]
    kind: str


class App:
    """The router's parts, wired; `await start()` its loops, then serve `front` (`olla.server`); `await close()`."""

    def __init__(self, config: Config) -> None:
        self.metrics = metrics = Metrics()
        default_slots = {name: profile.default_slots for name, profile in config.profiles.items()}
        self.registry = registry = Registry(config.discovery.endpoints, config.model_aliases, default_slots)
        metrics.declare(e.name for e in registry)
        balancer = BALANCERS[config.proxy.load_balancer]()
        self.queue = queue = SlotQueue(balancer, config.proxy.queue.max_size, config.proxy.queue.timeout, metrics,
                                       config.proxy.affinity.hold)  # fmt: skip
        registry.listeners.append(queue.wake)
        queue.recount = registry.recount
        self.config = LoadedConfig(config)
        self.client = Client(KEEPALIVE)
        self.proxy = Proxy(config, registry, Upstream(self.client, config.proxy), metrics, queue)
        self.monitors = Monitors(registry, metrics)
        self.traffic = Traffic()
        status = Status(registry, metrics, queue, self.config)
        # Status routes need a key only with server.auth.protect_status, and have their own rate budget.
        self.routes = {
            HEALTH_PATH: Route(status.health, GET, OPEN),
            "/internal/status": Route(status.status, GET, STATUS),
            "/internal/status/endpoints": Route(status.endpoints, GET, STATUS),
            "/internal/status/models": Route(status.status_models, GET, STATUS),
            "/metrics": Route(status.prometheus, GET, STATUS),
            "/olla/models": Route(status.models, GET, OTHER),
        }
        self.prefixes: dict[str, Profile] = {}  # "llamacpp" (of /olla/llamacpp/...) -> its profile
        for profile in config.profiles.values():
            for prefix in profile.prefixes:
                self.prefixes[prefix] = profile
                self.routes[f"/olla/{prefix}{profile.models_path}"] = Route(status.openai_models,
                                                                            frozenset({"GET"}), OTHER)  # fmt: skip
        self.admission = Admission(config.server, metrics)
        self.front = Front(self.dispatch, metrics, self.traffic, self.admission.headers)

    async def dispatch(self, request: Request, exchange: Exchange) -> Answer:
        """Admission, then the route the path names: one of olla's own, or a profile's prefix (forwarded)."""
        path = request.raw_path  # as sent: "%2F" or "/../" never turn into another route
        route = self.routes.get(path)
        kind = route.kind if route is not None else OTHER
        answer = self.admission.admit(request, exchange, kind == OPEN, kind == STATUS)
        if answer is not None:
            return answer
        if route is not None and request.method in route.methods:
            return await route.handler(request)
        if path.startswith("/olla/"):
            prefix, slash, rest = path[6:].partition("/")
            profile = self.prefixes.get(prefix) if slash else None
            if profile is not None:
                return await self.proxy.handle(request, exchange, profile, "/" + rest)
        if route is not None:
            raise MethodNotAllowed(request.method, request.path, ", ".join(sorted(route.methods)))
        raise RouteNotFound(f"{request.method} {request.path} is not served by olla")

    async def start(self) -> None:
        """Start every endpoint's probe, discovery and slot loops."""
        for endpoint in self.registry:
            self.monitors.start(endpoint, self.config.config, self.proxy.upstream)

    async def close(self) -> None:
        for endpoint in list(self.monitors.tasks):
            self.monitors.stop(endpoint)
        await self.monitors.stopped()
        self.client.close()

    async def serve(self, host: str, port: int, *, shutdown_timeout: float = 10.0,
                    head_timeout: float = HEAD_TIMEOUT) -> Server:  # fmt: skip
        """Start the loops and listen; `await stop(server)` undoes both."""
        await self.start()
        try:
            return await Server.start(self.front, host, port, prepare=self.front.prepare,
                                      shutdown_timeout=shutdown_timeout, head_timeout=head_timeout)  # fmt: skip
        except BaseException:
            await self.close()
            raise

    async def stop(self, server: Server) -> None:
        await server.stop()
        await self.close()


def create_app(config: Config) -> App:
    return App(config)


# ---- reload ------------------------------------------------------------------------------

# Read once at startup: a reload that changes them warns and keeps the running values.
NEEDS_RESTART: dict[str, Callable[[Config], object]] = {
    "server.host": lambda c: c.server.host,
    "server.port": lambda c: c.server.port,
    "profiles_dir": lambda c: c.profiles,
}


async def reload(app: App, path: str | Path) -> bool:
    """Load the config file and apply it; True when applied. A refused file leaves the running config serving."""
    try:
        apply(app, load_config(path))
    except ConfigError as exc:
        app.config.refused(exc.problems)
        log.error("config reload refused; the running config keeps serving",
                  extra={"source": str(path), "problems": exc.problems})  # fmt: skip
        return False
    await app.monitors.stopped()
    return True


def apply(app: App, config: Config) -> None:
    """Swap a new config in (see the module docstring); raises ConfigError when it cannot apply without a restart."""
    loaded, registry, proxy, monitors = app.config, app.registry, app.proxy, app.monitors
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
    app.metrics.declare(names["added"])
    proxy.configure(config)
    app.admission.reconfigure(config.server)
    intervals = (config.discovery.model_discovery_interval, config.discovery.slots_interval)
    restart_all = intervals != (running.discovery.model_discovery_interval, running.discovery.slots_interval)
    for endpoint in list(monitors.tasks) if restart_all else change.removed:
        monitors.stop(endpoint)
    for endpoint in list(registry) if restart_all else change.added:
        monitors.start(endpoint, config, proxy.upstream)
    app.queue.follow(list(registry), [e for e in change.removed if e.name in names["removed"]])
    loaded.swap(config)
    log.info("config reloaded", extra={"source": config.source, "sha256": config.sha256, **names})
    if restart:
        log.warning("config keys changed that take effect only after a restart", extra={"keys": restart})
