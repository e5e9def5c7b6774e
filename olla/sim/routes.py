"""llama-server's route table, and the routes that answer without a slot."""

from __future__ import annotations

import asyncio

from aiohttp import web

from olla.sim import bodies, errors, generate, props, tokens
from olla.sim.state import STATE, json_response


async def health(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if (fault := state.faults.get("slow_health")) is not None:
        await asyncio.sleep(fault.delay)
    if "fail_health" in state.faults:
        raise errors.server_error("Health check failed (injected fault)")
    return json_response({"status": "ok"})


async def models(request: web.Request) -> web.StreamResponse:
    return json_response(props.models(request.app[STATE].config))


async def get_props(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    return json_response(props.props(state.config, state.media_marker))


async def post_props(request: web.Request) -> web.StreamResponse:
    raise errors.not_supported("This server does not support changing global properties. Start it with `--props`")


async def slots(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.config.slots_endpoint:
        raise errors.not_supported("This server does not support slots endpoint. Start it with `--slots`")
    pool = state.engine.pool
    if request.query.get("fail_on_no_slot") and pool.busy == len(pool.slots):
        raise errors.unavailable("no slot available")
    return json_response(props.slots(state.config, pool.slots))


async def metrics(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    if not state.config.metrics:
        raise errors.not_supported("This server does not support metrics endpoint. Start it with `--metrics`")
    pool = state.engine.pool
    text = state.engine.metrics.scrape(processing=pool.busy, deferred=pool.waiting)
    return web.Response(
        body=text.encode(),
        headers={"Content-Type": "text/plain; version=0.0.4", "Process-Start-Time-Unix": str(int(state.started))},
    )


async def tokenize(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    content = body.get("content", "")
    if not isinstance(content, str):
        raise errors.invalid('"content" must be a string')
    ids = tokens.tokenize(content, add_bos=bodies.flag(body, "add_special"))
    if bodies.flag(body, "with_pieces"):
        return json_response({"tokens": [{"id": t, "piece": tokens.piece(t)} for t in ids]})
    return json_response({"tokens": ids})


async def detokenize(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    ids = body.get("tokens", [])
    if not isinstance(ids, list) or not all(tokens.is_valid(t) for t in ids):
        raise errors.invalid('"tokens" must be a list of token ids')
    return json_response({"content": tokens.detokenize(ids)})


async def apply_template(request: web.Request) -> web.StreamResponse:
    body = await bodies.read_json(request)
    return json_response({"prompt": tokens.chat_prompt(bodies.messages(body))})


def add_routes(app: web.Application) -> None:
    get = {
        "/health": health,
        "/v1/health": health,
        "/models": models,
        "/v1/models": models,
        "/props": get_props,
        "/slots": slots,
        "/metrics": metrics,
    }
    post = {
        "/props": post_props,
        "/completion": generate.completion,
        "/completions": generate.completion,
        "/v1/completions": generate.openai_completion,
        "/chat/completions": generate.chat,
        "/v1/chat/completions": generate.chat,
        "/infill": generate.infill,
        "/embedding": generate.embedding,
        "/embeddings": generate.embedding,
        "/v1/embeddings": generate.openai_embedding,
        "/tokenize": tokenize,
        "/detokenize": detokenize,
        "/apply-template": apply_template,
    }
    app.router.add_routes([web.get(path, handler) for path, handler in get.items()])
    app.router.add_routes([web.post(path, handler) for path, handler in post.items()])
