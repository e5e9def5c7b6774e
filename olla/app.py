"""`create_app(config)`: app keys, cleanup contexts, middlewares and routes; the only wiring."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from olla import discovery, health
from olla.affinity import AffinityMap
from olla.balancer import BALANCERS
from olla.config import Config
from olla.exchange import middleware
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


def create_app(config: Config) -> web.Application:
    metrics = Metrics()
    default_slots = {name: profile.default_slots for name, profile in config.profiles.items()}
    registry = Registry(config.discovery.endpoints, config.model_aliases, default_slots)
    metrics.declare(e.name for e in registry)
    balancer = BALANCERS[config.proxy.load_balancer]()
    queue = SlotQueue(balancer, config.proxy.queue.max_size, config.proxy.queue.timeout, metrics)
    registry.listeners.append(queue.wake)
    # Bodies are read and limited by the proxy itself, which answers 413 in OpenAI's shape.
    app = web.Application(middlewares=[middleware(metrics)], client_max_size=config.server.max_body_size)
    app[CONFIG] = config
    app[REGISTRY] = registry
    app[METRICS] = metrics
    app[QUEUE] = queue
    status = Status(registry, metrics, queue)

    app.cleanup_ctx.append(_upstream)
    app.cleanup_ctx.append(_monitors)

    routes = app.router
    for profile in config.profiles.values():
        for prefix in profile.prefixes:
            routes.add_get(f"/olla/{prefix}{profile.models_path}", status.openai_models, allow_head=False)
            routes.add_route("*", f"/olla/{prefix}/{{tail:.*}}", _proxied(app, profile))
    routes.add_get("/olla/models", status.models)
    routes.add_get("/internal/health", status.health)
    routes.add_get("/internal/status", status.status)
    routes.add_get("/internal/status/endpoints", status.endpoints)
    routes.add_get("/internal/status/models", status.status_models)
    routes.add_get("/metrics", status.prometheus)
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
        app[PROXY] = Proxy(
            config, app[REGISTRY], upstream, queue.balancer, app[METRICS], queue,
            AffinityMap(affinity.max_entries, affinity.ttl) if affinity.enabled else None,
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
