"""`create_app(config)`: app keys, cleanup contexts, middlewares and routes; the only wiring."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from olla import admission, discovery, health
from olla.admission import Admission
from olla.affinity import AffinityMap
from olla.balancer import BALANCERS
from olla.config import Config
from olla.exchange import Traffic
from olla.exchange import middleware as exchange_middleware
from olla.metrics import Metrics
from olla.proxy import Proxy
from olla.registry import Registry
from olla.slotqueue import SlotQueue
from olla.status import Status
from olla.upstream import KEEPALIVE, Upstream

CONFIG = web.AppKey("config", Config)
REGISTRY = web.AppKey("registry", Registry)
METRICS = web.AppKey("metrics", Metrics)
UPSTREAM = web.AppKey("upstream", Upstream)
PROXY = web.AppKey("proxy", Proxy)
QUEUE = web.AppKey("queue", SlotQueue)
ADMISSION = web.AppKey("admission", Admission)
TRAFFIC = web.AppKey("traffic", Traffic)
HEALTH_PATH = "/internal/health"  # always open: probes carry no key


def create_app(config: Config) -> web.Application:
    metrics = Metrics()
    default_slots = {name: profile.default_slots for name, profile in config.profiles.items()}
    registry = Registry(config.discovery.endpoints, config.model_aliases, default_slots)
    metrics.declare(e.name for e in registry)
    balancer = BALANCERS[config.proxy.load_balancer]()
    queue = SlotQueue(balancer, config.proxy.queue.max_size, config.proxy.queue.timeout, metrics)
    registry.listeners.append(queue.wake)
    status = Status(registry, metrics, queue)
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
    app[CONFIG] = config
    app[ADMISSION] = gate
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[QUEUE] = queue
    app[TRAFFIC] = traffic

    app.cleanup_ctx.append(_upstream)
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


async def _upstream(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=60, keepalive_timeout=KEEPALIVE)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        upstream = Upstream(session, config.proxy)
        app[UPSTREAM] = upstream
        queue = app[QUEUE]
        affinity = config.proxy.affinity
        slot_aware = queue.balancer.name == "slot-aware"  # affinity is part of slot-aware routing
        app[PROXY] = Proxy(
            config, app[REGISTRY], upstream, queue.balancer, app[METRICS], queue,
            AffinityMap(affinity.max_entries, affinity.ttl) if affinity.enabled and slot_aware else None,
        )  # fmt: skip
        yield


async def _monitors(app: web.Application) -> AsyncIterator[None]:
    """Per endpoint, on its own schedule: the probe loop, discovery, and slot reconciliation."""
    config, registry, upstream, metrics = app[CONFIG], app[REGISTRY], app[UPSTREAM], app[METRICS]
    interval = config.discovery.model_discovery_interval
    slots_interval = config.discovery.slots_interval
    tasks = []
    for endpoint in registry:
        profile = config.profiles[endpoint.config.type]
        tasks.append(asyncio.create_task(health.run(registry, upstream, endpoint, profile, metrics)))
        tasks.append(asyncio.create_task(discovery.run(registry, upstream, endpoint, profile, interval)))
        tasks.append(asyncio.create_task(discovery.run_slots(registry, upstream, endpoint, profile, slots_interval)))
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
