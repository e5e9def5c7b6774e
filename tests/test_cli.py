"""The `olla` command as a person runs it: check-config, version, and the demo end to end."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from olla import __version__
from tests.llamacpp import free_port

ROOT = Path(__file__).resolve().parent.parent


def olla(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "olla", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, cwd=cwd)  # fmt: skip


def test_version() -> None:
    done = olla("version")
    assert done.returncode == 0 and done.stdout.strip() == f"olla {__version__}"


def test_check_config_accepts_the_shipped_example() -> None:
    done = olla("check-config", "-c", str(ROOT / "config.yaml"), env={"LLAMA_API_KEY": "k"})
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout


def test_check_config_names_file_key_and_value(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy:\n  load_balancr: round-robin\nserver:\n  port: 99999\n")
    done = olla("check-config", "-c", str(bad))
    assert done.returncode == 1
    assert str(bad) in done.stderr
    assert "proxy.load_balancr" in done.stderr and "load_balancer" in done.stderr
    assert "server.port" in done.stderr and "99999" in done.stderr


def test_check_config_follows_olla_config_then_the_working_directory(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").write_text("server:\n  port: 1234\n")
    assert olla("check-config", cwd=tmp_path).returncode == 0
    missing = olla("check-config", env={"OLLA_CONFIG": str(tmp_path / "nope.yaml")}, cwd=tmp_path)
    assert missing.returncode == 1 and "nope.yaml" in missing.stderr


def _get(url: str, body: dict | None = None) -> tuple[int, dict, dict]:  # type: ignore[type-arg]
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, dict(r.headers), json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_demo_routes_a_chat_and_drains_on_sigterm() -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "olla", "serve", "--demo", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
    base = f"http://localhost:{port}"
    signalled = False
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                status = _get(base + "/internal/status")[2]
                if status["endpoints"]["healthy"] >= 4:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert time.monotonic() < deadline, "demo not ready in 30s"
            time.sleep(0.1)
        chat = {"model": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        code, headers, body = _get(base + "/olla/llamacpp/v1/chat/completions", chat)
        assert code == 200, body
        assert headers["X-Olla-Endpoint"].startswith("chat-")
        assert body["choices"][0]["message"]["role"] == "assistant"
        models = _get(base + "/olla/llamacpp/v1/models")[2]
        assert {"llama-3.2-1b-instruct", "qwen2.5-coder-1.5b"} <= {m["id"] for m in models["data"]}
        proc.send_signal(signal.SIGHUP)  # the demo has no file to reload: it says so and keeps serving

        # SIGTERM while a generation is in flight: it still finishes, then the process exits 0.
        slow = {**chat, "max_tokens": 60}  # about 0.7 s at the demo's 12 ms per token
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(_get, base + "/olla/llamacpp/v1/chat/completions", slow)
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            signalled = True
            time.sleep(0.1)
            refused, refused_headers, refusal = _get(base + "/olla/llamacpp/v1/chat/completions", chat)
            code, _, body = in_flight.result(timeout=15)
        assert code == 200 and body["usage"]["completion_tokens"] == 60
        assert refused == 503 and refusal["error"]["code"] == "shutting_down" and refused_headers["Retry-After"]
    finally:
        if not signalled:
            proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=20)[0]
    assert proc.returncode == 0, output
    assert "draining" in output and "stopped" in output and "reload unavailable" in output


def test_json_log_lines_carry_the_extra_fields() -> None:
    import logging

    from olla.logs import JsonFormatter

    record = logging.LogRecord("olla.access", logging.INFO, __file__, 1, "request", None, None)
    record.request_id, record.status = "r1", 200
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "request" and line["request_id"] == "r1" and line["status"] == 200
    assert line["level"] == "info" and line["logger"] == "olla.access"
