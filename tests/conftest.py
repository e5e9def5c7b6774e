from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import pytest

from olla import logs
from tests.llamacpp import LlamaServers, LlamaServerUnavailable, ServerSpec, binary, tiny_model
from tests.simkit import SimServers, StartSim, StartSims, sim_client

StartServers = Callable[..., LlamaServers]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def _failed(node: pytest.Item) -> bool:
    return any(getattr(getattr(node, f"report_{when}", None), "failed", False) for when in ("setup", "call"))


def require_llama_server() -> str:
    """The binary's path; without one a test fails under CI and skips loudly elsewhere."""
    try:
        return binary()
    except LlamaServerUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"llama-server is required under CI: {exc}")
        pytest.skip(f"llama-server unavailable (run scripts/llama-server.sh): {exc}")


@pytest.fixture
def start_llama_servers(request: pytest.FixtureRequest) -> Iterator[StartServers]:
    """Start real llama-servers: `start_llama_servers(spec, spec, ...)`; stopped and, on failure, logs shown."""
    require_llama_server()
    started: list[LlamaServers] = []

    def start(*specs: ServerSpec) -> LlamaServers:
        fleet = LlamaServers(list(specs)).__enter__()
        started.append(fleet)
        return fleet

    yield start
    for fleet in started:
        fleet.stop()
        if _failed(request.node):
            print(fleet.logs())


@pytest.fixture
def chat_model() -> ServerSpec:
    return ServerSpec(model=tiny_model("chat"), alias="tiny-chat")


@pytest.fixture
def code_model() -> ServerSpec:
    return ServerSpec(model=tiny_model("code"), alias="tiny-code")


@pytest.fixture
async def sim_servers() -> AsyncIterator[SimServers]:
    servers = SimServers()
    yield servers
    await servers.stop()


@pytest.fixture
def start_sims(sim_servers: SimServers) -> StartSims:
    """Start emulated llama-servers: `await start_sims(config, config, ...)`; all stopped after the test."""
    return sim_servers.start


@pytest.fixture
def start_sim(sim_servers: SimServers) -> StartSim:
    """Start one emulated llama-server: `await start_sim(**overrides)`, on top of simkit.SIM_DEFAULTS."""
    return sim_servers.start_one


@pytest.fixture
async def sim_session() -> AsyncIterator[aiohttp.ClientSession]:
    async with sim_client() as session:
        yield session


@pytest.fixture
def make_router(aiohttp_client):  # type: ignore[no-untyped-def]
    """`await make_router(endpoints, ready=N, **config_sections)`: a router client once N endpoints are routable."""
    from olla.app import create_app
    from tests.routerkit import RouterServer, router_config, wait_until

    async def make(endpoints: list[dict], ready: int | None = None, **sections: object):  # type: ignore[type-arg]
        client = await aiohttp_client(RouterServer(create_app(router_config(endpoints, **sections))))
        registry = client.app.registry
        want = len(endpoints) if ready is None else ready
        await wait_until(registry, lambda: sum(e.routable and e.discovery is not None for e in registry) >= want)
        return client

    return make


@pytest.fixture
def access_lines() -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """The access log turned on (JSON, into memory); call it for the lines written so far, parsed."""
    stream = io.StringIO()
    logs.access.configure(stream, "info", "json")
    try:

        def lines() -> list[dict[str, Any]]:
            logs.access.flush()
            return [json.loads(line) for line in stream.getvalue().splitlines()]

        yield lines
    finally:
        logs.access.configure(None)
