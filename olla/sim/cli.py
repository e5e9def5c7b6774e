"""`olla sim`: run one emulated llama-server until SIGINT or SIGTERM.

Faults can be injected while it runs:
    curl -X POST localhost:8080/_sim/fault -d '{"fault": "crash", "duration": 3}'
    curl -X DELETE localhost:8080/_sim/fault
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from olla.sim.config import SimConfig
from olla.sim.server import SimServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SimConfig()
    parser.add_argument("--model", default=defaults.model, help="model id the server reports (default %(default)s)")
    parser.add_argument("--slots", "-np", type=int, default=defaults.slots, help="parallel slots")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port")
    parser.add_argument("--prefill-ms", type=float, default=defaults.prefill_ms, help="per uncached prompt token")
    parser.add_argument("--decode-ms", type=float, default=defaults.decode_ms, help="per generated token")
    parser.add_argument(
        "--load-seconds", type=float, default=defaults.load_seconds, help="answer 503 'Loading model' this long"
    )
    parser.add_argument("--ctx", type=int, default=defaults.n_ctx, help="context per slot, in tokens")
    parser.add_argument(
        "--cache-ram-tokens", type=int, default=defaults.cache_ram_tokens, help="RAM prompt cache size; 0 disables it"
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--n-predict", type=int, default=defaults.n_predict, help="tokens when a request sets no limit")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false")
    parser.add_argument("--no-infill", dest="infill", action="store_false")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false")
    parser.add_argument("--no-slots", dest="slots_endpoint", action="store_false")


def config_from(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        model=args.model,
        slots=args.slots,
        n_ctx=args.ctx,
        cache_ram_tokens=args.cache_ram_tokens,
        prefill_ms=args.prefill_ms,
        decode_ms=args.decode_ms,
        load_seconds=args.load_seconds,
        api_key=args.api_key,
        embeddings=args.embeddings,
        infill=args.infill,
        metrics=args.metrics,
        slots_endpoint=args.slots_endpoint,
        seed=args.seed,
        n_predict=args.n_predict,
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = config_from(args)
    except ValueError as exc:
        print(f"olla sim: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_serve(config, args.host, args.port))
    except OSError as exc:
        print(f"olla sim: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: SimConfig, host: str, port: int) -> None:
    server = SimServer(config)
    await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # Same wording as llama-server's log line, so harnesses that parse one parse both.
    print(f"olla sim: {config.model}, {config.slots} slots, listening on {server.url}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()
