"""All endpoints and their live state; turns a requested model into a pool.

A model resolves through, in order: an endpoint's id or alias from /v1/models,
the file name of a path id (`x.gguf` matches `/models/x.gguf`), and the
configured `model_aliases`. The pool is every endpoint serving the model; its
tiers are its routable members grouped by priority, best first. A pool is worked
out once and kept until the registry next changes (discovery, health, a reload).

A reload hands the registry a new endpoint list (`replace`), matched by name. An
endpoint that is still the same server keeps its object, and so its health,
slots and discovery; any other key (priority, check_interval, check_timeout,
slots) takes effect at once. One whose url, type, model_url, health_check_url or
headers changed is another server, or the same one seen differently: it starts
afresh as a new object. A removed or replaced endpoint leaves every pool at once;
requests in flight on it finish, since they hold its object.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from olla.config import EndpointConfig
from olla.endpoint import Discovery, Endpoint, Health, Outcome, Probe
from olla.errors import ModelNotFound, ModelRequired, NoHealthyEndpoint

log = logging.getLogger("olla.health")


@dataclass(frozen=True)
class Pool:
    """The endpoints that serve one model, as the client named it."""

    model: str
    members: tuple[Endpoint, ...]

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """Its members' names: what identifies the pool across reloads (its waitlist's key)."""
        return frozenset(e.name for e in self.members)

    def tiers(self, exclude: Collection[Endpoint] = ()) -> list[list[Endpoint]]:
        """Routable members not yet tried, grouped by priority, best tier first."""
        by_priority: dict[int, list[Endpoint]] = {}
        for e in self.members:
            if e.routable and e not in exclude:  # endpoints compare by identity
                by_priority.setdefault(e.config.priority, []).append(e)
        if len(by_priority) < 2:
            return list(by_priority.values())
        return [by_priority[p] for p in sorted(by_priority, reverse=True)]

    def unavailable_reason(self) -> str:
        states = ", ".join(f"{e.name}={e.health}" for e in self.members)
        return f"no healthy endpoint serves model {self.model!r} ({states})"


# What makes an endpoint the same server across a reload; any other key may change under it.
IDENTITY = ("url", "type", "model_url", "health_check_url", "headers")
REMOVED = "removed from the config by a reload"
POOLS_KEPT = 1024


@dataclass(frozen=True)
class Change:
    """What a reload did to the endpoints; a replaced endpoint is both removed (old object) and added (new one)."""

    added: tuple[Endpoint, ...] = ()
    removed: tuple[Endpoint, ...] = ()
    updated: tuple[str, ...] = ()  # kept their state, took new settings

    def names(self) -> dict[str, list[str]]:
        """Endpoint names by what happened to them: added, removed, replaced, updated."""
        replaced = {e.name for e in self.removed} & {e.name for e in self.added}
        return {"added": sorted(e.name for e in self.added if e.name not in replaced),
                "removed": sorted(e.name for e in self.removed if e.name not in replaced),
                "replaced": sorted(replaced), "updated": list(self.updated)}  # fmt: skip


async def pause(delay: float, floor: float, wake: asyncio.Event) -> None:
    """Wait `delay` seconds, or only `floor` of them when `wake` is set meanwhile (or already)."""
    soonest = min(delay, floor)
    await asyncio.sleep(soonest)
    if delay > soonest and not wake.is_set():
        # Not asyncio.wait_for: on 3.11 it loses a cancel that comes as `wake` is set, and shutdown waits out `delay`.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay - soonest):
                await wake.wait()


@dataclass(frozen=True)
class Wakeups:
    """What an endpoint's discovery loops wait on besides their interval."""

    discover: asyncio.Event = field(default_factory=asyncio.Event)
    recount: asyncio.Event = field(default_factory=asyncio.Event)
    probe: asyncio.Event = field(default_factory=asyncio.Event)


class Registry:
    def __init__(
        self, endpoints: Sequence[EndpointConfig], aliases: Mapping[str, Sequence[str]] = {},
        default_slots: Mapping[str, int] = {},
    ) -> None:  # fmt: skip
        self.default_slots = dict(default_slots)
        self.endpoints: dict[str, Endpoint] = {c.name: self._new(c) for c in endpoints}
        self.aliases = {alias: tuple(ids) for alias, ids in aliases.items()}
        self._wakeups = {endpoint: Wakeups() for endpoint in self.endpoints.values()}
        self.changed = asyncio.Event()  # set on any health change; waited on by tests and status
        self._pools: dict[tuple[str | None, str | None], Pool] = {}  # until the next change: a lookup per request
        self.listeners: list[Callable[[Endpoint], None]] = []  # told when an endpoint's capacity may have changed

    def _new(self, config: EndpointConfig) -> Endpoint:
        endpoint = Endpoint(config)
        endpoint.slots.configured = config.slots
        endpoint.slots.default = self.default_slots.get(config.type, endpoint.slots.default)
        return endpoint

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.endpoints.values())

    def __len__(self) -> int:
        return len(self.endpoints)

    # --- the one writer of health -------------------------------------------------

    def record_probe(self, endpoint: Endpoint, probe: Probe, now: float) -> bool:
        before = endpoint.health
        recovered = endpoint.record_probe(probe, now)
        if endpoint.health is not before:
            self._signal_change(endpoint)
        return recovered

    def record_discovery(self, endpoint: Endpoint, discovery: Discovery, now: float) -> None:
        endpoint.record_discovery(discovery, now)
        self._signal_change(endpoint)

    def record_outcome(
        self, endpoint: Endpoint, outcome: Outcome, detail: str = "", since: float | None = None,
        conclusive: bool = True,
    ) -> bool:  # fmt: skip
        ejected = endpoint.record_outcome(outcome, detail, time.monotonic(), since, conclusive)
        if ejected:
            self._signal_change(endpoint)
            log.info("health changed", extra={"endpoint": endpoint.name, "from": Health.HEALTHY.value,
                                              "to": endpoint.health.value, "detail": endpoint.detail})  # fmt: skip
        return ejected

    def record_slots(self, endpoint: Endpoint, listing: object, own_before: int) -> None:
        """A /slots reading (or None when /slots is off or refused)."""
        freed = endpoint.slots.reconcile(listing, own_before) if listing is not None else endpoint.slots.unreadable()
        if freed:
            self._signal_change(endpoint)

    def discovery_event(self, endpoint: Endpoint) -> asyncio.Event:
        """Set when the endpoint should be (re)discovered: first health and every recovery."""
        return self._wakeups[endpoint].discover

    def recount_event(self, endpoint: Endpoint) -> asyncio.Event:
        """Set when the endpoint's /slots should be read again soon (`recount`)."""
        return self._wakeups[endpoint].recount

    def probe_event(self, endpoint: Endpoint) -> asyncio.Event:
        """Set when the endpoint should be probed as soon as its `check_interval` allows (`probe_soon`)."""
        return self._wakeups[endpoint].probe

    def probe_soon(self, pool: Pool) -> None:
        """Requests found no healthy endpoint in the pool: its offline members stop backing off their probes."""
        for endpoint in pool.members:
            wakeups = self._wakeups.get(endpoint)
            if wakeups is not None and endpoint.health is Health.OFFLINE:
                wakeups.probe.set()

    def recount(self, endpoint: Endpoint) -> None:
        """A request waits while the endpoint's slots are busy with other clients: have that checked soon."""
        wakeups = self._wakeups.get(endpoint)
        if wakeups is not None:
            wakeups.recount.set()

    def replace(self, endpoints: Sequence[EndpointConfig], aliases: Mapping[str, Sequence[str]]) -> Change:
        """Take a reloaded endpoint list and aliases (see the module docstring for what keeps its state)."""
        before = self.endpoints
        after: dict[str, Endpoint] = {}
        added: list[Endpoint] = []
        updated: list[str] = []
        for config in endpoints:
            endpoint = before.get(config.name)
            if endpoint is not None and _same_server(endpoint.config, config):
                if endpoint.config != config:
                    endpoint.config = config
                    endpoint.slots.configured = config.slots
                    updated.append(config.name)
            else:
                endpoint = self._new(config)
                self._wakeups[endpoint] = Wakeups()
                added.append(endpoint)
            after[config.name] = endpoint
        kept = set(after.values())
        removed = [e for e in before.values() if e not in kept]
        for endpoint in removed:
            del self._wakeups[endpoint]
            endpoint.health, endpoint.detail = Health.OFFLINE, REMOVED  # held only by requests in flight now
        self.endpoints = after
        self.aliases = {alias: tuple(ids) for alias, ids in aliases.items()}
        self._signal_changed()  # listeners are not told: pools held elsewhere must first follow the new endpoints
        return Change(tuple(added), tuple(removed), tuple(updated))

    def _signal_change(self, endpoint: Endpoint) -> None:
        self._signal_changed()
        for listener in self.listeners:
            listener(endpoint)

    def _signal_changed(self) -> None:
        self._pools.clear()
        self.changed.set()
        self.changed = asyncio.Event()

    # --- reading --------------------------------------------------------------------

    def of_type(self, kind: str | None) -> list[Endpoint]:
        return [e for e in self if kind is None or e.config.type == kind]

    def models(self, kind: str | None = None) -> dict[str, list[Endpoint]]:
        """Every model id the fleet serves (primary ids, deduplicated) with its endpoints."""
        found: dict[str, list[Endpoint]] = {}
        for endpoint in self.of_type(kind):
            if endpoint.discovery and endpoint.discovery.models:
                found.setdefault(endpoint.discovery.models[0], []).append(endpoint)
        return found

    def pool(self, model: str | None, kind: str | None = None) -> Pool:
        """The pool for a requested model among endpoints of one profile; raises the client's error when none."""
        pool = self._pools.get((model, kind))
        if pool is None:
            if len(self._pools) >= POOLS_KEPT:  # clients choose the names (`/any/dir/x.gguf` names x.gguf)
                self._pools.clear()
            pool = self._pools[(model, kind)] = self._pool(model, kind)
        return pool

    def _pool(self, model: str | None, kind: str | None) -> Pool:
        if model is None:
            return self._only_model(kind)
        wanted = (model, *self.aliases.get(model, ()))
        endpoints = self.of_type(kind)
        members = tuple(e for e in endpoints if any(e.serves(m) for m in wanted))
        if members:
            return Pool(model, members)
        undiscovered = [e.name for e in endpoints if e.discovery is None]
        if undiscovered:
            raise NoHealthyEndpoint(
                f"model {model!r} is not served by any discovered endpoint, and "
                f"{len(undiscovered)} endpoint(s) are not yet discovered: {', '.join(undiscovered)}"
            )
        raise ModelNotFound(f"Model not found: {model}")

    def _only_model(self, kind: str | None) -> Pool:
        models = self.models(kind)
        if len(models) == 1:
            (model, members), = models.items()
            return Pool(model, tuple(members))
        if not models:
            raise NoHealthyEndpoint("no endpoint has been discovered yet, so no model can be chosen")
        names = ", ".join(sorted(models))
        raise ModelRequired(
            f"this fleet serves several models ({names}); name one in the 'model' field or the X-Olla-Model header"
        )

    def counts(self) -> dict[str, int]:
        counts = {h.value: 0 for h in Health}
        for endpoint in self:
            counts[endpoint.health.value] += 1
        return counts


def _same_server(old: EndpointConfig, new: EndpointConfig) -> bool:
    return all(getattr(old, key) == getattr(new, key) for key in IDENTITY)
