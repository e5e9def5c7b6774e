"""Emulated llama-servers that decode slowly and stamp every streamed chunk with the moment it left.

    python -m bench.overhead.stamped --interval 0.5 --chunks 40 PORT [PORT ...]

olla's emulator (`olla sim`) cannot serve this scenario: its chunks carry no
send time. These answer what a router needs (`/health`, `/v1/models`, `/props`;
`/slots` is off) and stream llama.cpp's chat chunks, each with an extra
`"sent_ns"`: `time.monotonic_ns()` (CLOCK_MONOTONIC, the same clock in every
process) taken just before the chunk is written. Chunks are scheduled from the
stream's start with a random phase, so a thousand streams do not tick together.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import time

import orjson
import uvloop
from aiohttp import web

MODEL = "bench-slow"
SLOTS = 1024


def chunk(content: str, finish: str | None = None) -> bytes:
    event = {
        "choices": [{"finish_reason": finish, "index": 0, "delta": {"content": content} if content else {}}],
        "created": int(time.time()), "id": "chatcmpl-bench", "model": MODEL, "system_fingerprint": "b6000-bench",
        "object": "chat.completion.chunk", "sent_ns": time.monotonic_ns(),
    }  # fmt: skip
    return b"data: " + orjson.dumps(event) + b"\n\n"


def app(interval: float, chunks: int) -> web.Application:
    fixed = {
        "/health": {"status": "ok"},
        "/v1/models": {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "llamacpp"}]},
        "/props": {"total_slots": SLOTS, "default_generation_settings": {"n_ctx": 4096}},
    }

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body=orjson.dumps(fixed[request.path]))

    async def no_slots(request: web.Request) -> web.Response:
        return web.json_response({"error": {"code": 501, "message": "slots endpoint off"}}, status=501)

    async def chat(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Server": "llama.cpp"})
        await response.prepare(request)
        start = time.monotonic() + random.uniform(0, interval)
        for n in range(chunks):
            await asyncio.sleep(max(0.0, start + n * interval - time.monotonic()))
            await response.write(chunk("tok "))
        await response.write(chunk("", "length") + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    application = web.Application()
    application.router.add_routes([web.get(path, answer) for path in fixed])
    application.router.add_get("/slots", no_slots)
    application.router.add_post("/v1/chat/completions", chat)
    return application


async def serve(ports: list[int], interval: float, chunks: int) -> None:
    runner = web.AppRunner(app(interval, chunks), access_log=None, handler_cancellation=True)
    await runner.setup()
    for port in ports:
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between chunks of one stream")
    parser.add_argument("--chunks", type=int, default=40, help="content chunks per stream")
    parser.add_argument("ports", type=int, nargs="+")
    args = parser.parse_args()
    uvloop.run(serve(args.ports, args.interval, args.chunks))


if __name__ == "__main__":
    main()
