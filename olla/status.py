"""What the router serves itself: model lists, status, liveness and metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson

from olla import __version__
from olla.config import Config
from olla.endpoint import Endpoint
from olla.messages import Request, Response
from olla.metrics import CONTENT_TYPE, Metrics
from olla.registry import Registry
from olla.slotqueue import SlotQueue


def _json(data: Any) -> Response:
    return Response(200, orjson.dumps(data), [("Content-Type", "application/json"), ("Cache-Control", "no-store")])


def safe_url(url: str) -> str:
    """The endpoint's URL without userinfo or query, which may carry secrets."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@dataclass
class LoadedConfig:
    """The config in effect, when it was loaded, and how reloads went; a reload swaps `config`."""

    config: Config
    loaded_at: float = field(default_factory=time.time)
    reloads: int = 0
    last_reload_error: str | None = None  # while the latest reload was refused

    def swap(self, config: Config) -> None:
        self.config, self.loaded_at = config, time.time()
        self.reloads += 1
        self.last_reload_error = None

    def refused(self, problems: list[str]) -> None:
        self.last_reload_error = "; ".join(problems)

    def view(self) -> dict[str, Any]:
        view = {"source": self.config.source, "sha256": self.config.sha256, "reloads": self.reloads,
                "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(timespec="milliseconds")}  # fmt: skip
        if self.last_reload_error is not None:
            view["last_reload_error"] = self.last_reload_error
        return view


class Status:
    def __init__(
        self, registry: Registry, metrics: Metrics, queue: SlotQueue, loaded: LoadedConfig, backend_type: str = "llamacpp"
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.queue = queue
        self.loaded = loaded
        self.backend_type = backend_type
        self.started = time.time()
        self.started_monotonic = time.monotonic()

    def endpoint_view(self, e: Endpoint) -> dict[str, Any]:
        d = e.discovery
        now = time.monotonic()
        return {
            "name": e.name,
            "url": safe_url(e.config.url),
            "type": e.config.type,
            "priority": e.config.priority,
            "status": e.health.value,
            "detail": e.detail,
            "last_check_seconds_ago": round(now - e.last_check, 3) if e.last_check is not None else None,
            "last_check_latency_ms": round(e.last_latency * 1000, 1) if e.last_latency is not None else None,
            "consecutive_failures": max(e.probe_failures, e.breaker_failures),
            "models": list(d.models) if d else [],
            "total_slots": e.slots.total,
            "busy_slots": e.slots.busy,
            "slots_source": e.slots.source,
            "pace_ms": round(e.pace() * 1000, 1) if e.ttfb is not None else None,
            "n_ctx": d.n_ctx if d else None,
            "in_flight": e.in_flight,
            "requests": e.requests,
            "errors": e.errors,
        }

    async def openai_models(self, request: Request) -> Response:
        created = int(self.started)
        data = []
        for model, endpoints in sorted(self.registry.models().items()):
            if not any(e.routable for e in endpoints):
                continue
            aliases = sorted({m for e in endpoints if e.discovery for m in e.discovery.models} - {model})
            data.append({"id": model, "object": "model", "created": created, "owned_by": self.backend_type,
                         "aliases": aliases})  # fmt: skip
        for alias, targets in sorted(self.registry.aliases.items()):
            if any(entry["id"] in targets for entry in data):
                data.append({"id": alias, "object": "model", "created": created, "owned_by": "olla"})
        return _json({"object": "list", "data": data})

    async def models(self, request: Request) -> Response:
        return _json({"models": self._models()})

    def _queue(self, endpoints: list[Endpoint]) -> dict[str, Any]:
        for waitlist in self.queue.waitlists.values():
            if set(waitlist.pool.members) == set(endpoints):
                return {"length": len(waitlist.waiters), "waited": waitlist.waited, "rejected": waitlist.rejected,
                        "mean_wait_ms": round(waitlist.wait_seconds / waitlist.waited * 1000, 1)
                        if waitlist.waited else None}  # fmt: skip
        return {"length": 0, "waited": 0, "rejected": 0, "mean_wait_ms": None}

    def _models(self) -> list[dict[str, Any]]:
        out = []
        for model, endpoints in sorted(self.registry.models().items()):
            d = endpoints[0].discovery
            out.append({
                "id": model,
                "aliases": sorted({m for e in endpoints if e.discovery for m in e.discovery.models} - {model}),
                "available": any(e.routable for e in endpoints),
                "n_ctx_train": d.n_ctx_train if d else None,
                "size": d.size if d else None,
                "n_params": d.n_params if d else None,
                "endpoints": [{"name": e.name, "status": e.health.value, "priority": e.config.priority,
                               "total_slots": e.slots.total, "busy_slots": e.slots.busy} for e in endpoints],
                "queue": self._queue(endpoints),
            })  # fmt: skip
        return out

    async def health(self, request: Request) -> Response:
        return _json({"status": "healthy"})

    async def status(self, request: Request) -> Response:
        endpoints = list(self.registry)
        return _json({
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self.started_monotonic, 3),
            "endpoints": {"total": len(endpoints), **self.registry.counts()},
            "models": len(self.registry.models()),
            "in_flight": sum(e.in_flight for e in endpoints),
            "requests": sum(e.requests for e in endpoints),
            "errors": sum(e.errors for e in endpoints),
            "held_slots": {"now": len(self.queue.holds), "taken": self.queue.holds_taken,
                           "expired": self.queue.holds_expired},
            "config": self.loaded.view(),
        })  # fmt: skip

    async def endpoints(self, request: Request) -> Response:
        return _json({"endpoints": [self.endpoint_view(e) for e in self.registry]})

    async def status_models(self, request: Request) -> Response:
        return _json({"models": self._models()})

    async def prometheus(self, request: Request) -> Response:
        for e in self.registry:
            self.metrics.health.labels(e.name).state(e.health.value)
            self.metrics.slots.labels(e.name).set(e.slots.total)
            self.metrics.busy_slots.labels(e.name).set(e.slots.busy)
        return Response(200, self.metrics.render(), [("Content-Type", CONTENT_TYPE)])
