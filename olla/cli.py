"""The `olla` command: arguments, logging, and the serve lifecycle.

serve: load config → start (the demo's emulated fleet, then the router behind
its server, olla/server.py) → wait for SIGTERM/SIGINT → drain in-flight
requests up to `shutdown_timeout` → exit 0. A second signal exits at once.
SIGHUP meanwhile reloads the config file (`olla.app.reload`); the demo has none.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from olla import __version__
from olla.errors import ConfigError
from olla.logs import access, setup_logging

log = logging.getLogger("olla")


def _load(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The config file's path and its config."""
    from olla.config import find_config_path, load_config

    path = find_config_path(args.config, os.environ, Path.cwd())
    return path, load_config(path)


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        _, config = _load(args)
    except ConfigError as exc:
        print(f"invalid configuration ({len(exc.problems)} problem(s)):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    endpoints = config.discovery.endpoints
    print(f"{config.source}: ok ({len(endpoints)} endpoint(s), balancer {config.proxy.load_balancer})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config, path = None, None
    if not args.demo:
        try:
            path, config = _load(args)
        except ConfigError as exc:
            print("invalid configuration:\n  " + "\n  ".join(exc.problems), file=sys.stderr)
            return 1
    if config is not None:
        setup_logging(config.logging.level, config.logging.format)
    else:
        setup_logging("info", "text")
    main = serve(config, path) if config is not None else serve_demo(args.host, args.port)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


async def serve_demo(host: str, port: int) -> int:
    from olla import demo

    fleet, config = await demo.start(host, port)
    try:
        return await serve(config)
    finally:
        await fleet.__aexit__(None, None, None)


async def serve(config, path: Path | None = None) -> int:  # type: ignore[no-untyped-def]
    """Serve until SIGTERM/SIGINT; SIGHUP reloads `path` (None: there is no file to reload)."""
    from olla.app import create_app

    host, port = config.server.host, config.server.port
    app = create_app(config)
    try:
        # The drain below waits for requests in flight; whatever is left after it gets a last second.
        server = await app.serve(host, port, shutdown_timeout=1.0)
    except OSError as exc:
        log.error("cannot listen", extra={"host": host, "port": port, "error": str(exc)})
        return 1
    log.info("listening", extra={"url": f"http://{host}:{port}", "version": __version__,
                                 "endpoints": len(config.discovery.endpoints)})  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    reloading: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            os._exit(128 + signum)
        log.info("draining", extra={"signal": signal.Signals(signum).name,
                                    "timeout": app.config.config.server.shutdown_timeout})  # fmt: skip
        stop.set()

    def on_reload() -> None:
        if path is None:
            log.warning("reload unavailable: there is no config file (--demo)")
            return
        task = asyncio.create_task(_reload(app, path))
        reloading.add(task)
        task.add_done_callback(reloading.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_reload)
    await stop.wait()
    traffic = app.traffic
    traffic.draining = True  # new requests now get 503 shutting_down
    try:
        async with asyncio.timeout(app.config.config.server.shutdown_timeout):
            await traffic.idle()
    except TimeoutError:
        log.warning("drain timed out", extra={"in_flight": traffic.in_flight})
    await app.stop(server)
    access.flush()  # the access-log lines still waiting, before the last line of all
    log.info("stopped")
    return 0


async def _reload(app, path: Path) -> None:  # type: ignore[no-untyped-def]
    from olla.app import reload

    before = app.config.config.logging
    if await reload(app, path) and (after := app.config.config.logging) != before:
        setup_logging(after.level, after.format)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="olla", description="Route OpenAI-compatible traffic across llama.cpp servers")
    commands = parser.add_subparsers(dest="command", required=True)

    serve_cmd = commands.add_parser("serve", help="run the router")
    serve_cmd.add_argument("-c", "--config", help="config file (default: $OLLA_CONFIG, then ./config.yaml)")
    serve_cmd.add_argument("--demo", action="store_true", help="route to emulated llama.cpp servers started in-process")
    serve_cmd.add_argument("--host", default="localhost", help="listen address in --demo mode (default localhost)")
    serve_cmd.add_argument("--port", type=int, default=40114, help="listen port in --demo mode (default 40114)")
    serve_cmd.set_defaults(run=cmd_serve)

    check = commands.add_parser("check-config", help="validate a config file; exit 0 when valid, 1 with the errors")
    check.add_argument("-c", "--config", help="config file (default: $OLLA_CONFIG, then ./config.yaml)")
    check.set_defaults(run=cmd_check_config)

    from olla.sim import cli as sim_cli

    sim = commands.add_parser("sim", help="run an emulated llama.cpp llama-server")
    sim_cli.add_arguments(sim)
    sim.set_defaults(run=sim_cli.run)

    version = commands.add_parser("version", help="print the version")
    version.set_defaults(run=lambda _args: print(f"olla {__version__}") or 0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
