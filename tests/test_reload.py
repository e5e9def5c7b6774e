"""Reloading the config file while the router serves: endpoints come, go and change; a bad file is refused.

Routers here are built from a file, as `olla serve -c FILE` builds them, and
reloaded through `olla.app.reload`, which SIGHUP calls (the last test sends the
signal to a real process).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import subprocess
import sys
import time
import urllib.error
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from olla.app import create_app, reload
from olla.config import load_config
from tests.routerkit import CHAT, RouterServer, chat, ep, fast, post, wait_until
from tests.simkit import until
from tests.test_cli import ROOT, _get

Reloadable = Callable[..., Awaitable[TestClient]]


def write(path: Path, endpoints: list[dict[str, Any]], **sections: Any) -> None:
    """A config file (JSON is YAML) whose endpoints are checked often, so tests see state changes quickly."""
    full = [{"type": "llamacpp", "check_interval": "200ms", "check_timeout": "150ms", **e} for e in endpoints]
    raw = {"discovery": {"static": {"endpoints": full}}, "logging": {"level": "warning"}, **sections}
    path.write_text(json.dumps(raw, indent=2))


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    return tmp_path / "config.yaml"


@pytest.fixture
def file_router(aiohttp_client, config_file: Path) -> Reloadable:  # type: ignore[no-untyped-def]
    """`await file_router(endpoints, **sections)`: write the file, serve a router from it, wait until it routes."""

    async def make(endpoints: list[dict[str, Any]], **sections: Any) -> TestClient:
        write(config_file, endpoints, **sections)
        client = await aiohttp_client(RouterServer(create_app(load_config(config_file))))
        await ready(client, *(e["name"] for e in endpoints))
        return client

    return make


async def ready(client: TestClient, *names: str) -> None:
    registry = client.app.registry

    def serving() -> bool:
        endpoints = registry.endpoints
        return all(n in endpoints and endpoints[n].routable and endpoints[n].discovery for n in names)

    await wait_until(registry, serving)


async def served_by(client: TestClient, body: dict[str, Any] | None = None) -> str:
    r = await post(client, body or chat())
    assert r.status == 200, await r.text()
    return r.headers["X-Olla-Endpoint"]


async def config_status(client: TestClient) -> dict[str, Any]:
    status: dict[str, Any] = (await (await client.get("/internal/status")).json())["config"]
    return status


async def test_an_added_endpoint_becomes_routable(start_sims, file_router, config_file) -> None:
    chat_sim, other_sim = await start_sims(fast(), fast("other-model"))
    client = await file_router([ep("a", chat_sim)])
    assert (await post(client, chat("other-model"))).status == 404

    write(config_file, [ep("a", chat_sim), ep("b", other_sim)])
    assert await reload(client.app, config_file)
    await ready(client, "b")
    assert await served_by(client, chat("other-model")) == "b"
    assert await served_by(client) == "a"
    metrics = await (await client.get("/metrics")).text()
    assert 'olla_requests_in_flight{endpoint="b"} 0.0' in metrics


async def test_a_removed_endpoint_finishes_its_stream_and_stops_its_loops(start_sims, file_router, config_file) -> None:
    slow, spare = await start_sims(fast(decode_ms=20.0), fast())
    client = await file_router([ep("slow", slow, 100), ep("spare", spare, 50)])
    registry = client.app.registry
    removed = registry.endpoints["slow"]
    loops = list(client.app.monitors.tasks[removed])

    stream = await client.post("/olla/llamacpp/v1/chat/completions", json=chat(tokens=40, stream=True))
    assert stream.status == 200 and stream.headers["X-Olla-Endpoint"] == "slow"
    first = await stream.content.readany()  # the stream is under way: about 0.8 s of tokens to come
    write(config_file, [ep("spare", spare, 50)])
    assert await reload(client.app, config_file)

    assert all(task.done() for task in loops) and removed not in client.app.monitors.tasks
    assert "slow" not in registry.endpoints and not removed.routable
    assert await served_by(client) == "spare"
    rest = await stream.content.read()
    assert b"[DONE]" in first + rest and removed.in_flight == 0 and removed.slots.own == 0
    listed = (await (await client.get("/internal/status/endpoints")).json())["endpoints"]
    assert [e["name"] for e in listed] == ["spare"]


async def test_a_priority_change_moves_traffic_and_keeps_the_endpoints_state(
    start_sims, file_router, config_file
) -> None:
    a, b = await start_sims(fast(), fast())
    client = await file_router([ep("a", a, 100), ep("b", b, 50)])
    registry, monitors = client.app.registry, client.app.monitors
    before = registry.endpoints["a"]
    loops = list(monitors.tasks[before])
    assert {await served_by(client) for _ in range(3)} == {"a"}

    write(config_file, [ep("a", a, 10), ep("b", b, 50)])
    assert await reload(client.app, config_file)
    assert {await served_by(client) for _ in range(3)} == {"b"}
    assert registry.endpoints["a"] is before and before.requests == 3 and before.routable
    assert monitors.tasks[before] == loops and not any(task.done() for task in loops)


async def test_a_changed_url_is_a_new_endpoint(start_sims, file_router, config_file) -> None:
    old, new = await start_sims(fast(), fast("moved-model"))
    client = await file_router([ep("a", old)])
    registry = client.app.registry
    before = registry.endpoints["a"]

    write(config_file, [ep("a", new)])
    assert await reload(client.app, config_file)
    await ready(client, "a")
    assert registry.endpoints["a"] is not before
    assert await served_by(client, chat("moved-model")) == "a"
    assert (await post(client, chat())).status == 404


async def test_a_queued_request_follows_its_endpoint_through_a_headers_change(
    start_sims, file_router, config_file
) -> None:
    (sim,) = await start_sims(fast(slots=1, decode_ms=10.0))
    client = await file_router([ep("only", sim)])
    busy = asyncio.create_task(post(client, chat(tokens=40)))  # holds the only slot for about 0.4 s
    await until(lambda: sim.busy_slots == 1, 1.0)
    queued = asyncio.create_task(post(client, chat()))
    await until(lambda: sum(len(w.waiters) for w in client.app.queue.waitlists.values()) == 1, 1.0)

    write(config_file, [ep("only", sim, headers={"X-Tenant": "blue"})])  # the same server, seen differently
    assert await reload(client.app, config_file)
    assert (await busy).status == 200
    answer = await queued
    assert answer.status == 200 and answer.headers["X-Olla-Endpoint"] == "only"


async def test_an_invalid_file_is_refused_and_the_old_config_keeps_serving(
    start_sims, file_router, config_file, caplog
) -> None:
    (a,) = await start_sims(fast())
    client = await file_router([ep("a", a)])
    before = await config_status(client)

    config_file.write_text("proxy:\n  load_balancr: round-robin\n")
    with caplog.at_level(logging.ERROR, "olla.config"):
        assert not await reload(client.app, config_file)
    (line,) = [r for r in caplog.records if r.name == "olla.config"]
    assert "refused" in line.getMessage() and "proxy.load_balancr" in str(line.problems)  # type: ignore[attr-defined]
    assert await served_by(client) == "a"
    after = await config_status(client)
    assert "proxy.load_balancr" in after["last_reload_error"] and str(config_file) in after["last_reload_error"]
    assert {k: after[k] for k in before} == before

    write(config_file, [ep("a", a)])
    assert await reload(client.app, config_file)
    assert "last_reload_error" not in await config_status(client)


async def test_status_shows_the_files_hash_and_load_time(start_sims, file_router, config_file) -> None:
    (a,) = await start_sims(fast())
    client = await file_router([ep("a", a)])
    first = await config_status(client)
    assert first["source"] == str(config_file) and first["reloads"] == 0
    assert first["sha256"] == hashlib.sha256(config_file.read_bytes()).hexdigest()

    write(config_file, [ep("a", a, 7)])
    assert await reload(client.app, config_file)
    second = await config_status(client)
    assert second["sha256"] == hashlib.sha256(config_file.read_bytes()).hexdigest() != first["sha256"]
    assert datetime.fromisoformat(second["loaded_at"]) > datetime.fromisoformat(first["loaded_at"])
    assert second["reloads"] == 1


async def test_live_settings_follow_and_restart_only_keys_warn(start_sims, file_router, config_file, caplog) -> None:
    (a,) = await start_sims(fast())
    client = await file_router([ep("a", a)])
    assert (await post(client, chat("assistant"))).status == 404

    keys = {"api_keys": [{"key": "k-1", "client": "team"}]}
    write(config_file, [ep("a", a)], server={"port": 41999, "auth": keys}, model_aliases={"assistant": [CHAT]},
          proxy={"load_balancer": "round-robin"})  # fmt: skip
    with caplog.at_level(logging.WARNING, "olla.config"):
        assert await reload(client.app, config_file)
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.keys == ["server.port"]  # type: ignore[attr-defined]
    assert (await post(client, chat("assistant"))).status == 401
    r = await post(client, chat("assistant"), headers={"Authorization": "Bearer k-1"})
    assert r.status == 200 and r.headers["X-Olla-Routing-Strategy"] == "round-robin"


def test_sighup_reloads_the_file_of_a_running_olla(tmp_path: Path) -> None:
    from tests.llamacpp import free_port

    port = free_port()
    path = tmp_path / "config.yaml"
    write(path, [], server={"port": port})
    proc = subprocess.Popen([sys.executable, "-m", "olla", "serve", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
    status_url = f"http://localhost:{port}/internal/status"

    def status_when(ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                status = _get(status_url)[2]
                if ready(status):
                    return status
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "status not reached in 20s"
            time.sleep(0.05)

    try:
        started = status_when(lambda s: True)
        assert started["endpoints"]["total"] == 0 and started["config"]["reloads"] == 0
        write(path, [{"name": "added", "url": f"http://127.0.0.1:{free_port()}"}], server={"port": port})
        proc.send_signal(signal.SIGHUP)
        reloaded = status_when(lambda s: s["config"]["reloads"] == 1)
        assert reloaded["endpoints"]["total"] == 1
        assert reloaded["config"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    finally:
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
