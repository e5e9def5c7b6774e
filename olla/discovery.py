"""Discovery: learn each endpoint's model ids, aliases, context and slots.

Models and totals: on an endpoint's first healthy probe, on every recovery, and
every `discovery.model_discovery.interval`. Busy slots: `/slots` every
`discovery.slots_interval` (see `run_slots`). `/v1/models` is required; `/props` is
optional (an instance behind an API key the router lacks, or an older build,
still routes by its model list).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from olla.endpoint import Discovery, Endpoint
from olla.errors import UpstreamError
from olla.profiles import Profile
from olla.registry import Registry, pause
from olla.upstream import Upstream

log = logging.getLogger("olla.discovery")
TIMEOUT = 10.0


class DiscoveryFailed(UpstreamError):
    code = "discovery_failed"


def parse_discovery(models: Any, props: Any) -> Discovery:
    if not isinstance(models, dict) or not isinstance(models.get("data"), list) or not models["data"]:
        raise ValueError("expected an OpenAI model list with at least one entry in 'data'")
    names: list[str] = []
    meta: dict[str, Any] = {}
    for entry in models["data"]:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            names.append(entry["id"])
            names.extend(a for a in entry.get("aliases") or () if isinstance(a, str))
            found = entry.get("meta")
            meta = meta or (found if isinstance(found, dict) else {})
    if not names:
        raise ValueError("no entry in 'data' has a string 'id'")
    props = props if isinstance(props, dict) else {}
    settings = props.get("default_generation_settings")
    n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
    return Discovery(
        models=tuple(dict.fromkeys(names)),
        n_ctx=_int(n_ctx) or _int(meta.get("n_ctx")),
        n_ctx_train=_int(meta.get("n_ctx_train")),
        total_slots=_int(props.get("total_slots")),
        model_path=props.get("model_path") if isinstance(props.get("model_path"), str) else None,
        size=_int(meta.get("size")),
        n_params=_int(meta.get("n_params")),
    )


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def discover(upstream: Upstream, endpoint: Endpoint, profile: Profile) -> Discovery:
    models_url = endpoint.url_for(endpoint.config.model_url, profile.models_path)
    async for attempt in AsyncRetrying(
        stop=stop_after_attempt(3),
        wait=wait_exponential(multiplier=0.2, max=2.0),
        retry=retry_if_exception_type(UpstreamError),
        reraise=True,
    ):
        with attempt:
            status, models = await upstream.get_json(endpoint, models_url, TIMEOUT)
            if status != 200:
                raise DiscoveryFailed(f"endpoint {endpoint.name}: {models_url} answered {status}")
    props: Any = None
    try:
        status, props = await upstream.get_json(endpoint, endpoint.url_for(None, profile.props_path), TIMEOUT)
        props = props if status == 200 else None
    except UpstreamError:
        props = None
    try:
        return parse_discovery(models, props)
    except ValueError as exc:
        raise DiscoveryFailed(f"endpoint {endpoint.name}: {models_url}: {exc}") from exc


async def run(registry: Registry, upstream: Upstream, endpoint: Endpoint, profile: Profile, interval: float) -> None:
    """Discover whenever the probe loop asks (first health, recovery) and every `interval`."""
    wanted = registry.discovery_event(endpoint)
    while True:
        try:
            async with asyncio.timeout(interval):  # not wait_for: see registry.pause
                await wanted.wait()
        except TimeoutError:
            if not endpoint.routable:
                continue
        wanted.clear()
        try:
            found = await discover(upstream, endpoint, profile)
        except UpstreamError as exc:
            log.warning("discovery failed", extra={"endpoint": endpoint.name, "error": exc.message})
            continue
        registry.record_discovery(endpoint, found, time.monotonic())
        log.info("discovered", extra={"endpoint": endpoint.name, "models": list(found.models),
                                      "total_slots": found.total_slots})  # fmt: skip


SLOTS_TIMEOUT = 2.0
UNREADABLE_BACKOFF = 10  # an endpoint whose /slots is off or refused is asked this many times less often
RECOUNT_GAP = 1.0  # the shortest time between two /slots reads of one endpoint


async def run_slots(registry: Registry, upstream: Upstream, endpoint: Endpoint, profile: Profile, interval: float) -> None:
    """Reconcile busy slots with `/slots` every `interval` while the endpoint is routable.

    llama-server answers /slots on its main loop, so it is never polled faster
    than about once a second (much faster polling was seen to slow generation
    about 30 times). When requests wait in the router while the endpoint's slots
    are busy with other clients (`Registry.recount`), the next read comes as
    soon as that floor allows, so slots those clients free are seen sooner.
    """
    url = endpoint.url_for(None, profile.slots_path)
    recount = registry.recount_event(endpoint)
    while True:
        wait = interval * (UNREADABLE_BACKOFF if endpoint.slots.readable is False else 1)
        await pause(wait, RECOUNT_GAP, recount)  # sooner when requests wait on other clients' load
        recount.clear()
        if not endpoint.routable:
            continue
        own_before = endpoint.slots.own
        try:
            status, listing = await upstream.get_json(endpoint, url, SLOTS_TIMEOUT)
        except UpstreamError:
            continue
        registry.record_slots(endpoint, listing if status == 200 else None, own_before)
