from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

from tests.llamacpp import LlamaServers, LlamaServerUnavailable, ServerSpec, binary, tiny_model

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
