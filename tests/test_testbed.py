"""The test bed itself: real llama-servers and the emulator behave alike where the router looks.

Each behaviour runs against both a real llama-server and the emulator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from olla.sim import SimConfig, SimServer
from tests.llamacpp import ServerSpec, tiny_model

N_PREDICT = 800  # about 100 ms a wave on the tiny model; the pairs finish within a few ms


@pytest.fixture(params=["real", "sim"])
async def backend(request: pytest.FixtureRequest, start_llama_servers: Callable[..., object]) -> AsyncIterator[str]:
    """A two-slot server: a real llama-server or the emulator tuned to similar speed."""
    if request.param == "real":
        servers = start_llama_servers(ServerSpec(model=tiny_model("chat"), alias="tiny-chat", slots=2))
        yield servers[0].url  # type: ignore[index]
        return
    sim = SimServer(SimConfig(model="tiny-chat", slots=2, prefill_ms=0.05, decode_ms=0.15))
    await sim.start(host="127.0.0.1", port=0)
    try:
        yield sim.url
    finally:
        await sim.stop()


async def test_three_real_servers_start_and_answer(start_llama_servers, chat_model, code_model) -> None:
    servers = start_llama_servers(chat_model, chat_model, code_model)
    async with aiohttp.ClientSession() as session:
        for server, alias in zip(servers, ("tiny-chat", "tiny-chat", "tiny-code")):
            async with session.get(server.url + "/health") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}
            async with session.get(server.url + "/v1/models") as r:
                assert (await r.json())["data"][0]["id"] == alias
            async with session.get(server.url + "/props") as r:
                assert (await r.json())["total_slots"] == 2


async def test_two_slots_six_requests_finish_in_three_waves(backend: str) -> None:
    body = {"prompt": "waves", "n_predict": N_PREDICT, "ignore_eos": True, "cache_prompt": False}
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> tuple[int, float]:
            async with session.post(backend + "/completion", json={**body, "prompt": f"waves {i}"}) as r:
                await r.read()
                return r.status, time.monotonic() - started

        results = await asyncio.gather(*(one(i) for i in range(6)))
    assert [status for status, _ in results] == [200] * 6
    finished = sorted(t for _, t in results)
    # Two at a time: finish times form three groups, each wave well after the one before.
    first, second, third = finished[0:2], finished[2:4], finished[4:6]
    wave = first[1]
    assert second[0] > first[1] + 0.4 * wave, finished
    assert third[0] > second[1] + 0.4 * wave, finished


async def test_extending_a_prompt_hits_the_prompt_cache(backend: str) -> None:
    history = "You are a terse assistant. " * 20
    async with aiohttp.ClientSession() as session:
        async with session.post(backend + "/completion", json={"prompt": history, "n_predict": 2}) as r:
            first = (await r.json())["timings"]
        longer = {"prompt": history + "And one more line.", "n_predict": 2}
        async with session.post(backend + "/completion", json=longer) as r:
            second = (await r.json())["timings"]
    assert first["cache_n"] == 0
    assert second["cache_n"] > 0
    assert second["prompt_n"] < first["prompt_n"]
    assert second["prompt_ms"] < first["prompt_ms"]


async def test_a_conversation_pushed_out_of_its_slot_is_restored_from_the_ram_prompt_cache(backend: str) -> None:
    # Three unrelated prompts on two slots: by the third, the first has lost its slot.
    a = "Conversation A about slots. " * 18
    b = "Totally different text about queues and routers. " * 10
    c = "A third topic, on bees and the weather today. " * 11
    async with aiohttp.ClientSession() as session:

        async def timings(prompt: str) -> dict[str, float]:
            async with session.post(backend + "/completion", json={"prompt": prompt, "n_predict": 2}) as r:
                assert r.status == 200
                return (await r.json())["timings"]

        first_a, first_b = await timings(a), await timings(b)
        third = await timings(c)
        next_a, next_b = await timings(a + " next turn"), await timings(b + " more")
    assert third["cache_n"] <= 2  # nothing but the start of the prompt in common
    for first, following in ((first_a, next_a), (first_b, next_b)):
        assert following["cache_n"] >= first["prompt_n"], (first, following)
        assert following["prompt_n"] < first["prompt_n"] / 10, (first, following)
