"""Faults on demand, the admin endpoint, fleets of emulated servers and `olla sim`."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
import time

import aiohttp
import orjson
import pytest

from olla.sim import Fault, SimConfig, SimFleet, SimServer
from olla.sim import cli as sim_cli
from tests.simkit import until

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 20, "stream": True}
SHORT = aiohttp.ClientTimeout(total=None, sock_connect=2, sock_read=0.3)


async def read_events(response: aiohttp.ClientResponse) -> tuple[list[str], BaseException | None]:
    """SSE payloads until the stream ends, and the error that ended it, if any."""
    events: list[str] = []
    try:
        async for line in response.content:
            if line.startswith(b"data: "):
                events.append(line.decode().removeprefix("data: ").strip())
    except (aiohttp.ClientError, TimeoutError) as exc:
        return events, exc
    return events, None


async def health(session: aiohttp.ClientSession, sim: SimServer) -> int:
    async with session.get(sim.url + "/health") as r:
        return r.status


# --- listener faults ---------------------------------------------------------------


async def test_refuse_stops_listening_until_cleared_on_the_same_port(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    url = sim.url
    assert await health(sim_session, sim) == 200
    sim.set_fault("refuse")
    with pytest.raises(aiohttp.ClientConnectorError):
        await health(sim_session, sim)
    sim.clear_faults()
    assert sim.url == url and await health(sim_session, sim) == 200


async def test_crash_cuts_every_connection_and_clearing_restarts_with_empty_caches(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=20.0)
    prompt = {"prompt": "remember me", "n_predict": 1}
    async with sim_session.post(sim.url + "/completion", json=prompt) as r:
        assert (await r.json())["timings"]["cache_n"] == 0
    stream = await sim_session.post(sim.url + "/v1/chat/completions", json={**CHAT, "max_tokens": 200})
    await stream.content.readline()
    sim.set_fault("crash")
    events, error = await read_events(stream)
    stream.close()
    assert isinstance(error, aiohttp.ClientError) and "[DONE]" not in events
    await until(lambda: sim.busy_slots == 0, 0.5)
    with pytest.raises(aiohttp.ClientConnectorError):
        await health(sim_session, sim)
    sim.clear_faults()
    assert await health(sim_session, sim) == 200
    async with sim_session.post(sim.url + "/completion", json=prompt) as r:
        assert (await r.json())["timings"]["cache_n"] == 0


# --- generation faults ---------------------------------------------------------------


async def test_hang_headers_never_answers_generation_but_health_still_does(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("hang_headers")
    with pytest.raises(TimeoutError):
        await sim_session.post(sim.url + "/v1/chat/completions", json=CHAT, timeout=SHORT)
    assert await health(sim_session, sim) == 200
    await until(lambda: sim.busy_slots == 0 and sim.waiting == 0, 0.5)
    sim.clear_faults()
    async with sim_session.post(sim.url + "/v1/chat/completions", json=CHAT) as r:
        assert r.status == 200


async def test_hang_stream_sends_some_tokens_then_goes_silent_holding_the_slot(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("hang_stream", after=2)
    async with sim_session.post(sim.url + "/v1/chat/completions", json=CHAT, timeout=SHORT) as r:
        assert r.status == 200
        events, error = await read_events(r)
        assert isinstance(error, TimeoutError)
        assert len(events) == 3 and "role" in events[0]  # the role delta, then two tokens
        assert sim.busy_slots == 1
    await until(lambda: sim.busy_slots == 0, 0.5)


async def test_cut_stream_drops_the_connection_after_some_tokens(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("cut_stream", after=3)
    async with sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 20, "stream": True}) as r:
        assert r.status == 200
        events, error = await read_events(r)
    assert isinstance(error, aiohttp.ClientPayloadError)
    assert [orjson.loads(e)["tokens_predicted"] for e in events] == [1, 2, 3]
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 20})
    await until(lambda: sim.busy_slots == 0, 0.5)


@pytest.mark.parametrize("status", [500, 502, 503])
async def test_status_answers_generation_with_an_error_body(start_sim, sim_session, status) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("status", status=status)
    routes = [("/v1/chat/completions", CHAT), ("/completion", {"prompt": "x"}), ("/v1/embeddings", {"input": "x"})]
    for path, body in routes:
        async with sim_session.post(sim.url + path, json=body) as r:
            assert r.status == status
            error = (await r.json())["error"]
            assert error["code"] == status and error["message"] and error["type"]
    assert await health(sim_session, sim) == 200
    async with sim_session.get(sim.url + "/v1/models") as r:
        assert r.status == 200


async def test_slow_health_and_fail_health_touch_only_health(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("slow_health", delay=0.3)
    started = time.monotonic()
    assert await health(sim_session, sim) == 200
    assert time.monotonic() - started >= 0.3
    sim.set_fault("fail_health")
    async with sim_session.get(sim.url + "/v1/health") as r:
        assert r.status == 500 and (await r.json())["error"]["type"] == "server_error"
    sim.clear_faults()
    async with sim_session.post(sim.url + "/completion", json={"prompt": "x", "n_predict": 1}) as r:
        assert r.status == 200


async def test_loading_sends_every_path_back_to_503(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("loading")
    for path in ("/health", "/v1/models", "/slots"):
        async with sim_session.get(sim.url + path) as r:
            assert r.status == 503 and (await r.json())["error"]["message"] == "Loading model"
    sim.clear_faults("loading")
    assert await health(sim_session, sim) == 200


async def test_a_fault_with_a_duration_clears_itself(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0)
    sim.set_fault("crash", duration=0.2)
    with pytest.raises(aiohttp.ClientConnectorError):
        await health(sim_session, sim)
    await asyncio.sleep(0.4)
    assert await health(sim_session, sim) == 200


# --- the admin endpoint ---------------------------------------------------------------


async def test_the_admin_endpoint_sets_and_clears_faults_past_the_api_key(start_sim, sim_session) -> None:
    sim = await start_sim(decode_ms=2.0, api_key="sekrit", load_seconds=5.0)
    async with sim_session.post(sim.url + "/_sim/fault", json={"fault": "status", "status": 502}) as r:
        assert r.status == 200
        assert [f["name"] for f in (await r.json())["faults"]] == ["status"]
    assert sim.state.faults["status"].status == 502
    async with sim_session.post(sim.url + "/_sim/fault", json={"fault": "bogus"}) as r:
        assert r.status == 400 and "unknown fault" in (await r.json())["error"]["message"]
    async with sim_session.post(sim.url + "/_sim/fault", json={"fault": "status", "status": 200}) as r:
        assert r.status == 400
    async with sim_session.delete(sim.url + "/_sim/fault") as r:
        assert r.status == 200 and (await r.json())["faults"] == []
    async with sim_session.post(sim.url + "/_sim/fault", json={"fault": "crash"}) as r:
        assert r.status == 200
    with pytest.raises(aiohttp.ClientConnectorError):
        await health(sim_session, sim)
    sim.clear_faults()
    assert await health(sim_session, sim) == 503  # a restarted server loads its model again


def test_fault_parameters_are_checked() -> None:
    assert Fault.parse("cut_stream", after=4).after == 4
    assert Fault.parse("status", status=502).message.startswith("Bad gateway")
    for name, params in [
        ("nope", {}),
        ("status", {"status": 200}),
        ("cut_stream", {"after": -1}),
        ("slow_health", {"delay": "soon"}),
        ("refuse", {"duration": 0}),
        ("hang_stream", {"colour": "red"}),
    ]:
        with pytest.raises(ValueError):
            Fault.parse(name, **params)


# --- fleets and the command line ------------------------------------------------------


async def test_twenty_servers_run_in_one_process(sim_session) -> None:
    configs = [SimConfig(model=f"model-{i % 4}", slots=1 + i % 3) for i in range(20)]
    async with SimFleet(configs) as fleet:
        assert len(set(fleet.urls)) == 20
        statuses = await asyncio.gather(*(health(sim_session, s) for s in fleet.servers))
        assert statuses == [200] * 20
        async with sim_session.get(fleet.urls[7] + "/props") as r:
            props = await r.json()
        assert props["model_alias"] == "model-3" and props["total_slots"] == 2
    with pytest.raises(aiohttp.ClientConnectorError):
        await health(sim_session, fleet.servers[0])


def test_the_command_line_builds_the_config() -> None:
    parser = argparse.ArgumentParser()
    sim_cli.add_arguments(parser)
    args = parser.parse_args(
        "--model m --slots 3 --port 0 --prefill-ms 0.1 --decode-ms 2 --load-seconds 1 --ctx 1024 "
        "--api-key k --no-embeddings".split()
    )
    config = sim_cli.config_from(args)
    assert config == SimConfig(
        model="m", slots=3, n_ctx=1024, prefill_ms=0.1, decode_ms=2.0, load_seconds=1.0, api_key="k", embeddings=False
    )
    assert sim_cli.config_from(parser.parse_args([])).infill is True


async def test_olla_sim_serves_until_terminated(sim_session) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "olla", "sim", "--model", "cli-model", "--port", "0",
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    try:
        assert process.stderr is not None
        line = (await asyncio.wait_for(process.stderr.readline(), 20)).decode()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line
        async with sim_session.get(match.group(1) + "/v1/models") as r:
            assert (await r.json())["data"][0]["id"] == "cli-model"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
