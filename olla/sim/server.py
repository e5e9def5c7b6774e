"""One emulated llama-server: its app, its listener, and the faults it is showing.

The gate in front of every route runs in llama-server's order: loading (503 on
every path), then the API key (all but /health), then the route, where unknown
paths and wrong methods are 404. `/_sim/...` is the emulator's own admin and
skips all three.

The listening socket is owned here rather than by an aiohttp site, so `refuse`
and `crash` can close it and clearing them can bind the same port again.
Handlers are cancelled when their client goes away, so a client that leaves
gives its slot or queue place back at once.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from olla.sim import errors, routes
from olla.sim.config import SimConfig
from olla.sim.engine import Engine
from olla.sim.faults import LISTENER_FAULTS, Fault
from olla.sim.state import STATE, State, json_response

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("olla.sim")
PUBLIC_PATHS = ("/health", "/v1/health")
ADMIN_PREFIX = "/_sim/"
MAX_BODY_BYTES = 64 * 1024 * 1024  # long prompts; aiohttp's default 1 MiB would answer its own 413
REBIND_RETRY = 0.05  # seconds between attempts to listen again after a crash or refuse clears
KEEPALIVE_SECONDS = 5.0  # llama-server's cpp-httplib drops idle connections after 5 s


class SimServer:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.state = State(config, Engine(config))
        self.app = self._build_app()
        self._runner: web.AppRunner | None = None
        self._listener: asyncio.AbstractServer | None = None
        self._sock: socket.socket | None = None
        self._serving: asyncio.Task[None] | None = None
        self._host = "127.0.0.1"
        self._port = 0
        self._timers: dict[str, asyncio.TimerHandle] = {}

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def busy_slots(self) -> int:
        return self.state.engine.pool.busy

    @property
    def waiting(self) -> int:
        return self.state.engine.pool.waiting

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,
            keepalive_timeout=KEEPALIVE_SECONDS,
            shutdown_timeout=1.0,
            access_log=None,
        )
        await runner.setup()
        self._runner = runner
        self._sock = _bind(host, port)
        self._host, self._port = host, self._sock.getsockname()[1]
        await self._serve(self._sock)

    async def stop(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._close_listener()
        if self._serving is not None:
            await asyncio.gather(self._serving, return_exceptions=True)
        if self._runner is not None:
            self._drop_connections()
            await self._runner.cleanup()
            self._runner = None

    def set_fault(self, name: str, *, _spare: asyncio.BaseTransport | None = None, **params: Any) -> Fault:
        """Start showing a fault (see olla.sim.faults); ValueError when it makes no sense."""
        fault = Fault.parse(name, **params)
        if name in LISTENER_FAULTS and self._runner is None:
            raise ValueError(f"{name} needs a listener: use SimServer.start(), not an external runner")
        self.state.faults[name] = fault
        if name in LISTENER_FAULTS:
            self._close_listener()
        if name == "refuse":
            self._close_connections()
        if name == "crash":
            self._drop_connections(spare=_spare)
        if (timer := self._timers.pop(name, None)) is not None:
            timer.cancel()
        if fault.duration is not None:
            loop = asyncio.get_running_loop()
            self._timers[name] = loop.call_later(fault.duration, self.clear_faults, name)
        return fault

    def clear_faults(self, name: str | None = None) -> None:
        """Stop showing one fault, or all; a cleared refuse or crash listens again at once."""
        names = [name] if name is not None else list(self.state.faults)
        cleared = [n for n in names if self.state.faults.pop(n, None) is not None]
        for n in names:
            if (timer := self._timers.pop(n, None)) is not None:
                timer.cancel()
        if "crash" in cleared:
            self.state.engine.restart()
            self.state.begin_loading()
        if any(n in LISTENER_FAULTS for n in cleared) and not any(n in self.state.faults for n in LISTENER_FAULTS):
            self._listen_again()

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[_gate], client_max_size=MAX_BODY_BYTES)
        app[STATE] = self.state
        routes.add_routes(app)
        app.router.add_route("*", "/_sim/fault", self._admin_fault)
        app.on_startup.append(self._on_startup)
        app.on_response_prepare.append(_llama_headers)
        return app

    async def _on_startup(self, app: web.Application) -> None:
        self.state.begin_loading()

    async def _admin_fault(self, request: web.Request) -> web.StreamResponse:
        if request.method == "GET":
            return json_response(self._describe())
        if request.method == "DELETE":
            self.clear_faults(request.query.get("fault"))
            return json_response(self._describe())
        if request.method != "POST":
            return json_response(errors.NOT_FOUND, status=404)
        try:
            params = await request.json()
            if not isinstance(params, dict):
                raise ValueError("body must be an object like {\"fault\": \"refuse\"}")
            name = params.pop("fault", None)
            self.set_fault(name, _spare=request.transport, **params)
        except ValueError as exc:
            return json_response({"error": {"code": 400, "message": str(exc), "type": "invalid_request_error"}}, 400)
        response = json_response(self._describe())
        if name == "crash":
            response.force_close()
        return response

    def _describe(self) -> dict[str, Any]:
        return {
            "faults": [vars(f) for f in self.state.faults.values()],
            "busy_slots": self.busy_slots,
            "waiting": self.waiting,
        }

    async def _serve(self, sock: socket.socket) -> None:
        if self._runner is None or self._runner.server is None or sock.fileno() < 0:
            return
        listener = await asyncio.get_running_loop().create_server(self._runner.server, sock=sock)
        if self._sock is not sock:  # refused or crashed again while starting
            listener.close()
            return
        self._listener = listener

    def _listen_again(self) -> None:
        if self._runner is None or self._sock is not None or any(n in self.state.faults for n in LISTENER_FAULTS):
            return
        loop = asyncio.get_running_loop()
        # Bind and listen now, so connections made right after this call wait in the backlog.
        try:
            self._sock = _bind(self._host, self._port)
        except OSError as exc:  # e.g. the port taken meanwhile as some client's ephemeral port: try again shortly
            log.warning("cannot listen again, retrying", extra={"port": self._port, "error": str(exc)})
            loop.call_later(REBIND_RETRY, self._listen_again)
            return
        self._serving = loop.create_task(self._serve(self._sock))

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
        elif self._sock is not None:
            self._sock.close()
        self._listener = self._sock = None

    def _close_connections(self) -> None:
        """Close idle keep-alive connections now, busy ones once their response is out."""
        if self._runner is None or self._runner.server is None:
            return
        for connection in self._runner.server.connections:
            transport = connection.transport
            if transport is not None and transport not in self.state.active:
                _hang_up(transport)
            connection.close()

    def _drop_connections(self, spare: asyncio.BaseTransport | None = None) -> None:
        if self._runner is None or self._runner.server is None:
            return
        for connection in self._runner.server.connections:
            transport = connection.transport
            if transport is not None and transport is not spare:
                _hang_up(transport)
                transport.abort()


def _hang_up(transport: asyncio.BaseTransport) -> None:
    """Send FIN now rather than on the next loop turn, so a pooled client sees it before reusing the connection."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except (OSError, TypeError):  # TypeError: uvloop's transport sockets refuse shutdown(); its close is at once
            pass
    transport.close()


@web.middleware
async def _gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[STATE]
    transport = request.transport
    if transport is not None:
        state.active.add(transport)
    try:
        return await _gated(request, handler, state)
    finally:
        if transport is not None:
            state.active.discard(transport)


async def _gated(request: web.Request, handler: Handler, state: State) -> web.StreamResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return await handler(request)
    if state.loading:
        return json_response(errors.LOADING, status=503)
    if request.method == "OPTIONS":
        return web.Response(
            headers={
                "Access-Control-Allow-Credentials": "true",
                "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
                "Access-Control-Allow-Headers": "*",
            }
        )
    key = state.config.api_key
    if key is not None and request.path not in PUBLIC_PATHS and not _authorized(request, key):
        return json_response(errors.BAD_API_KEY, status=401)
    try:
        return await handler(request)
    except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
        return json_response(errors.NOT_FOUND, status=404)
    except errors.SimError as exc:
        return json_response(exc.body(), status=exc.status)


def _authorized(request: web.Request, key: str) -> bool:
    header = request.headers.get("Authorization")
    if header is None:
        given = request.headers.get("X-Api-Key", "")
    else:
        given = header.removeprefix("Bearer ") if header.startswith("Bearer ") else ""
    return hmac.compare_digest(given.encode(), key.encode())


async def _llama_headers(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "llama.cpp"
    response.headers["Access-Control-Allow-Origin"] = request.headers.get("Origin", "")


def _bind(host: str, port: int) -> socket.socket:
    family, type_, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
