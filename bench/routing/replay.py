"""One run: a fresh fleet and router, the trace replayed against them, a result per request."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from bench.common import router
from bench.routing.fleet import fleet_process
from bench.routing.workload import FLEET, PATH, SETUPS, Request


@dataclass(frozen=True)
class Result:
    request: Request
    status: int  # 0: no HTTP answer
    ttft: float | None = None  # to the first chunk with content
    e2e: float | None = None
    finished: float = 0.0  # seconds after the start
    reply: str = ""
    output_tokens: int = 0
    cache_n: int = 0
    prompt_n: int = 0
    endpoint: str = ""
    affinity: str = ""
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.e2e is not None


def router_config(urls: list[str], balancer: str, affinity: bool) -> dict[str, Any]:
    endpoints = [{"name": name, "url": url, "type": "llamacpp", "check_interval": "1s"}
                 for name, url in zip(FLEET, urls, strict=True)]  # fmt: skip
    return {
        "server": {"shutdown_timeout": "1s"},
        "proxy": {"load_balancer": balancer, "affinity": {"enabled": affinity}},
        "discovery": {"slots_interval": "1s", "static": {"endpoints": endpoints}},
        "logging": {"level": "warning"},
    }


async def wait_ready(base: str, timeout: float = 30.0) -> None:
    """Every endpoint healthy, with its model discovered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as session:
        while loop.time() < deadline:
            async with session.get(base + "/internal/status/endpoints") as r:
                endpoints = (await r.json())["endpoints"]
            if len(endpoints) == len(FLEET) and all(e["status"] == "healthy" and e["models"] for e in endpoints):
                return
            await asyncio.sleep(0.1)
    raise TimeoutError("the router never found every endpoint healthy")


async def ask(session: aiohttp.ClientSession, url: str, request: Request, messages: list[dict[str, str]],
              start: float) -> Result:  # fmt: skip
    body = {"model": request.model, "messages": messages, "max_tokens": request.max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    loop = asyncio.get_running_loop()
    sent = loop.time()
    ttft: float | None = None
    parts: list[str] = []
    last: dict[str, Any] = {}
    try:
        async with session.post(url, json=body) as response:
            head = {"endpoint": response.headers.get("X-Olla-Endpoint", ""),
                    "affinity": response.headers.get("X-Olla-Affinity", "")}  # fmt: skip
            if response.status != 200:
                text = await response.text()
                return Result(request, response.status, finished=loop.time() - start, error=text[:200], **head)
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                event = orjson.loads(line[6:])
                if "error" in event:
                    return Result(request, 200, finished=loop.time() - start, error=str(event["error"])[:200], **head)
                for choice in event.get("choices") or ():
                    if content := (choice.get("delta") or {}).get("content"):
                        ttft = ttft if ttft is not None else loop.time() - sent
                        parts.append(content)
                last.update((k, event[k]) for k in ("timings", "usage") if k in event)
    except (aiohttp.ClientError, ValueError) as exc:
        return Result(request, 0, finished=loop.time() - start, error=f"{type(exc).__name__}: {exc}"[:200])
    now = loop.time()
    timings = last.get("timings", {})
    return Result(
        request, 200, ttft, now - sent, now - start, "".join(parts), last.get("usage", {}).get("completion_tokens", 0),
        timings.get("cache_n", 0), timings.get("prompt_n", 0), error="" if timings else "no timings", **head,
    )  # fmt: skip


async def replay(base: str, system: str, requests: list[Request], limit: float) -> list[Result]:
    """Send the trace: one-shots at their time, a conversation's turn at its time or once the previous one ended."""
    results: list[Result] = []
    sessions: dict[int, list[Request]] = defaultdict(list)
    for r in requests:
        if r.session is not None:
            sessions[r.session].append(r)
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        url, start = base + PATH, loop.time() + 0.1

        async def due(r: Request) -> None:
            await asyncio.sleep(max(0.0, start + r.at - loop.time()))

        async def one_shot(r: Request) -> None:
            await due(r)
            results.append(await ask(session, url, r, [{"role": "user", "content": r.text}], start))

        async def conversation(turns: list[Request]) -> None:
            history = [{"role": "system", "content": system}]
            for r in turns:
                await due(r)
                history.append({"role": "user", "content": r.text})
                result = await ask(session, url, r, history, start)
                results.append(result)
                history.append({"role": "assistant", "content": result.reply})

        tasks = [asyncio.create_task(one_shot(r)) for r in requests if r.session is None]
        tasks += [asyncio.create_task(conversation(turns)) for turns in sessions.values()]
        _, pending = await asyncio.wait(tasks, timeout=start + limit - loop.time())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return results


@dataclass(frozen=True)
class Run:
    setup: str
    level: float
    requests: list[Request]
    results: list[Result]
    waits: dict[str, Any]
    limit: float  # seconds after the start at which unfinished requests were cut


def cut_after(duration: float) -> float:
    """Seconds after its start at which a run with `duration` seconds of arrivals is cut."""
    return max(20.0, 1.5 * duration)


def run_once(setup: str, level: float, system: str, requests: list[Request], limit: float) -> Run:
    balancer, affinity = SETUPS[setup]
    with fleet_process(limit + 60) as (urls, stop_fleet):
        with router(router_config(urls, balancer, affinity)) as base:
            asyncio.run(wait_ready(base))
            results = asyncio.run(replay(base, system, requests, limit))
        waits = stop_fleet()
    return Run(setup, level, requests, results, waits, limit)
