"""Debian's nginx in two roles: a fixed llama.cpp-shaped endpoint, and the plain reverse proxy to compare with.

Each runs as its own process (one worker, `daemon off`, everything under a
temporary directory, loopback ports), so its CPU is its own.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import orjson

from bench.common import process

NGINX = "/usr/sbin/nginx"
SLOTS = 256  # above every connection count, so the router never queues for a slot


def _json(document: Any) -> str:
    text = orjson.dumps(document).decode()
    if "'" in text or "$" in text:  # nginx would end the string or expand a variable
        raise ValueError("an nginx return body holds no ' or $")
    return text


def chat_reply(model: str) -> dict[str, Any]:
    return {
        "choices": [{"finish_reason": "length", "index": 0,
                     "message": {"role": "assistant", "content": "The quick brown fox jumps over the lazy dog."}}],
        "created": 1760000000, "model": model, "system_fingerprint": "b6000-bench", "object": "chat.completion",
        "usage": {"completion_tokens": 10, "prompt_tokens": 12, "total_tokens": 22},
        "id": "chatcmpl-0123456789abcdef0123456789abcdef",
        "timings": {"prompt_n": 12, "prompt_ms": 1.2, "predicted_n": 10, "predicted_ms": 10.0},
    }  # fmt: skip


def endpoint_locations(model: str) -> str:
    """What llama-server answers on the paths a router (and the benchmark) use, fixed."""
    answers = {
        "/health": {"status": "ok"},
        "/v1/models": {"object": "list", "data": [{"id": model, "object": "model", "owned_by": "llamacpp",
                                                   "meta": {"n_ctx_train": 4096}}]},
        "/props": {"total_slots": SLOTS, "model_path": f"/models/{model}.gguf",
                   "default_generation_settings": {"n_ctx": 4096}},
        "/v1/chat/completions": chat_reply(model),
    }  # fmt: skip
    blocks = [f"location = {path} {{ return 200 '{_json(body)}'; }}" for path, body in answers.items()]
    not_supported = {"error": {"code": 501, "message": "This server does not support slots endpoint.",
                               "type": "not_supported_error"}}  # fmt: skip
    blocks.append(f"location = /slots {{ return 501 '{_json(not_supported)}'; }}")
    return "\n".join(blocks)


def proxy_locations(upstream: str, streaming: bool) -> str:
    return (
        f"location / {{ proxy_pass http://{upstream}; proxy_http_version 1.1; proxy_set_header Connection \"\";"
        + (" proxy_buffering off;" if streaming else "")
        + " }"
    )


def conf(directory: Path, servers: Sequence[tuple[Sequence[int], str]], upstreams: dict[str, int]) -> str:
    """An nginx.conf: one worker, no access log; `servers` are (ports, locations); `upstreams` name -> port.

    Upstream connections are kept alive, except to `stream` upstreams: llama-server closes the
    connection after a streamed reply without saying so, and nginx would answer 502 on reusing it."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {directory / kind};" for kind in kinds)
    pools = "\n".join(
        f"upstream {name} {{ server 127.0.0.1:{port};"
        + ("" if name.startswith("stream") else " keepalive 256; keepalive_requests 1000000;") + " }"
        for name, port in upstreams.items()
    )
    blocks = "\n".join(
        "server { " + " ".join(f"listen 127.0.0.1:{p} backlog=4096;" for p in ports)
        + " default_type application/json; " + locations + " }"
        for ports, locations in servers
    )
    return f"""
worker_processes 1;
daemon off;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  {temp}
  keepalive_requests 1000000;
  keepalive_timeout 60s;
  {pools}
  {blocks}
}}
"""


@contextlib.contextmanager
def nginx(
    servers: Sequence[tuple[Sequence[int], str]], upstreams: dict[str, int] | None = None
) -> Iterator[subprocess.Popen[Any]]:
    """An nginx process serving `servers`; its error log is shown if it fails to start."""
    with tempfile.TemporaryDirectory(prefix="olla-bench-nginx-") as name:
        directory = Path(name)
        path = directory / "nginx.conf"
        path.write_text(conf(directory, servers, upstreams or {}))
        args = [NGINX, "-c", str(path), "-p", str(directory)]
        check = subprocess.run([*args, "-t", "-q"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refused its generated config:\n{check.stderr}")
        with process(args) as proc:
            yield proc
