"""All endpoints and their live state; turns a requested model into a pool.

A model resolves through, in order: an endpoint's id or alias from /v1/models,
the file name of a path id (`x.gguf` matches `/models/x.gguf`), and the
configured `model_aliases`. The pool is every endpoint serving the model; its
tiers are its routable members grouped by priority, best first.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from olla.config import EndpointConfig
from olla.endpoint import Discovery, Endpoint, Health, Outcome, Probe
from olla.errors import ModelNotFound, ModelRequired, NoHealthyEndpoint


@dataclass(frozen=True)
class Pool:
    """The endpoints that serve one model, as the client named it."""

    model: str
    members: tuple[Endpoint, ...]

    def tiers(self, exclude: Iterable[Endpoint] = ()) -> list[list[Endpoint]]:
        """Routable members not yet tried, grouped by priority, best tier first."""
        skip = set(map(id, exclude))
        by_priority: dict[int, list[Endpoint]] = {}
        for e in self.members:
            if e.routable and id(e) not in skip:
                by_priority.setdefault(e.config.priority, []).append(e)
        return [by_priority[p] for p in sorted(by_priority, reverse=True)]

    def unavailable_reason(self) -> str:
        states = ", ".join(f"{e.name}={e.health}" for e in self.members)
        return f"no healthy endpoint serves model {self.model!r} ({states})"


class Registry:
    def __init__(
        self, endpoints: Sequence[EndpointConfig], aliases: Mapping[str, Sequence[str]] = {},
        default_slots: Mapping[str, int] = {},
    ) -> None:  # fmt: skip
        self.endpoints: dict[str, Endpoint] = {c.name: Endpoint(c) for c in endpoints}
        for endpoint in self.endpoints.values():
            endpoint.slots.configured = endpoint.config.slots
            endpoint.slots.default = default_slots.get(endpoint.config.type, endpoint.slots.default)
        self.aliases = {alias: tuple(ids) for alias, ids in aliases.items()}
        self._discover = {name: asyncio.Event() for name in self.endpoints}
        self.changed = asyncio.Event()  # set on any health change; waited on by tests and status
        self.listeners: list[Callable[[Endpoint], None]] = []  # told when an endpoint's capacity may have changed

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

    def record_outcome(self, endpoint: Endpoint, outcome: Outcome, detail: str = "") -> bool:
        ejected = endpoint.record_outcome(outcome, detail)
        if ejected:
            self._signal_change(endpoint)
        return ejected

    def record_slots(self, endpoint: Endpoint, listing: object, own_before: int) -> None:
        """A /slots reading (or None when /slots is off or refused)."""
        freed = endpoint.slots.reconcile(listing, own_before) if listing is not None else endpoint.slots.unreadable()
        if freed:
            self._signal_change(endpoint)

    def discovery_event(self, endpoint: Endpoint) -> asyncio.Event:
        """Set when the endpoint should be (re)discovered: first health and every recovery."""
        return self._discover[endpoint.name]

    def _signal_change(self, endpoint: Endpoint) -> None:
        self.changed.set()
        self.changed = asyncio.Event()
        for listener in self.listeners:
            listener(endpoint)

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
