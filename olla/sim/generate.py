"""The routes that take a slot: completions, chat, infill and embeddings.

A request waits for a slot before anything is written, so a deferred request
has no status line yet. A stream's headers go out with its first token, which
is why a prompt that overflows the context gets a plain JSON 400 even when
streaming; its connection is closed once it ends. Injected generation faults
act here, at the token they name.
"""

from __future__ import annotations

import asyncio
import base64
import struct
import time
from typing import Any

import orjson
from aiohttp import web

from olla.sim import bodies, errors, tokens
from olla.sim.engine import Generation, Task
from olla.sim.params import sampling_params
from olla.sim.props import BUILD_INFO
from olla.sim.replies import Chat, Completion, Format, Native, Reply
from olla.sim.state import STATE, State, json_response

NATIVE, COMPLETION, CHAT = Native(), Completion(), Chat()


class _Cut(Exception):
    """The connection was dropped on purpose (cut_stream)."""


async def completion(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    return await _generate(request, NATIVE, bodies.prompt_tokens(body), body)


async def openai_completion(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    return await _generate(request, COMPLETION, bodies.prompt_tokens(body), body)


async def chat(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    return await _generate(request, CHAT, bodies.chat_tokens(body), body)


async def infill(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.config.infill:
        raise errors.not_supported(
            "Infill is not supported by this model: prefix token is missing. "
            "suffix token is missing. middle token is missing. "
        )
    body = await bodies.read_json(request)
    if "input_suffix" not in body:
        raise errors.server_error("[json.exception.out_of_range.403] key 'input_suffix' not found")
    texts = {k: body.get(k, "") for k in ("input_prefix", "input_suffix", "prompt")}
    if not all(isinstance(v, str) for v in texts.values()):
        raise errors.invalid('"input_prefix", "input_suffix" and "prompt" must be strings')
    extra = body.get("input_extra") or []
    if not isinstance(extra, list) or not all(isinstance(c, dict) for c in extra):
        raise errors.invalid('"input_extra" must be an array of {"filename": string, "text": string}')
    prompt = tokens.infill_prompt(texts["input_prefix"], texts["input_suffix"], texts["prompt"], extra)
    return await _generate(request, NATIVE, prompt, body)


async def embedding(request: web.Request) -> web.StreamResponse:
    inputs, _ = await _embedding_inputs(request)
    vectors = await request.app[STATE].engine.embed(inputs)
    return json_response([{"index": i, "embedding": [v]} for i, v in enumerate(vectors)])


async def openai_embedding(request: web.Request) -> web.StreamResponse:
    inputs, body = await _embedding_inputs(request)
    state = request.app[STATE]
    vectors = await state.engine.embed(inputs)
    as_base64 = body.get("encoding_format") == "base64"
    n = sum(len(i) for i in inputs)
    return json_response(
        {
            "model": body.get("model") or state.config.model,
            "object": "list",
            "usage": {"prompt_tokens": n, "total_tokens": n},
            "data": [
                {"embedding": _base64(v) if as_base64 else v, "index": i, "object": "embedding"}
                for i, v in enumerate(vectors)
            ],
        }
    )


async def _embedding_inputs(request: web.Request) -> tuple[list[list[int]], dict[str, Any]]:
    state = request.app[STATE]
    if not state.config.embeddings:
        raise errors.not_supported("This server does not support embeddings. Start it with `--embeddings`")
    body = await bodies.read_json(request)
    inputs = bodies.embedding_inputs(body)
    await _before_slot(state)
    return inputs, body


def _base64(vector: list[float]) -> str:
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def _before_slot(state: State) -> None:
    if (fault := state.faults.get("status")) is not None:
        raise errors.SimError(fault.status, fault.message)
    if "hang_headers" in state.faults:
        await _forever()


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()


async def _at_token(request: web.Request, state: State, gen: Generation) -> None:
    """Where the token faults strike: slow_decode before every token; hang_stream, cut_stream after `after` tokens."""
    if (fault := state.faults.get("slow_decode")) is not None:
        await gen.stall(fault.delay)
    produced = len(gen.tokens)
    if (fault := state.faults.get("hang_stream")) is not None and produced >= fault.after:
        await _forever()
    if (fault := state.faults.get("cut_stream")) is not None and produced >= fault.after:
        if request.transport is not None:
            request.transport.abort()
        raise _Cut


async def _generate(request: web.Request, fmt: Format, prompt: list[int], body: dict[str, Any]) -> web.StreamResponse:
    state = request.app[STATE]
    n_predict = bodies.integer(body, "n_predict", "max_completion_tokens", "max_tokens", default=-1)
    stream = bodies.flag(body, "stream")
    options = body.get("stream_options")
    reply = Reply(
        model=state.config.model,
        id=state.engine.completion_id(),
        created=int(time.time()),
        fingerprint=BUILD_INFO,
        settings=sampling_params(n_predict, stream, full=True),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        return_tokens=bodies.flag(body, "return_tokens"),
    )
    task = Task(
        prompt=prompt,
        n_predict=n_predict,
        params=sampling_params(n_predict, stream),
        id_slot=bodies.integer(body, "id_slot", default=-1),
        seed=bodies.seed(body),
        cache_prompt=bodies.flag(body, "cache_prompt", default=True),
    )
    await _before_slot(state)
    async with state.engine.generation(task) as gen:
        await gen.prefill()
        if stream:
            return await _stream(request, state, fmt, reply, gen)
        try:
            while not gen.done:
                await _at_token(request, state, gen)
                await gen.next_token()
        except _Cut:
            return web.Response()
        return json_response(fmt.whole(reply, gen))


async def _stream(request: web.Request, state: State, fmt: Format, reply: Reply, gen: Generation) -> web.StreamResponse:
    response: web.StreamResponse | None = None
    try:
        while True:
            if not gen.done:
                await _at_token(request, state, gen)
            token = await gen.next_token()
            events: list[dict[str, Any]] = []
            if response is None:
                response = await _open_stream(request)
                events += fmt.opening(reply, gen)
            if token is None:
                await response.write(_sse(events + fmt.closing(reply, gen), fmt.done_marker))
                await response.write_eof()
                # llama-server hangs up after every streamed reply, without a `Connection: close`.
                request.protocol.close()
                return response
            await response.write(_sse(events + fmt.partial(reply, gen, token), False))
    except _Cut:
        return response or web.Response()


async def _open_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    return response


def _sse(events: list[dict[str, Any]], done: bool) -> bytes:
    out = b"".join(b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + b"data: [DONE]\n\n" if done else out
