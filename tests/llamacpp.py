"""Run real llama-server processes for tests and benchmarks.

    with LlamaServers([ServerSpec(model=path, alias="tiny-chat", slots=2)] * 3) as servers:
        servers[0].url  # "http://127.0.0.1:PORT", /health already answered 200

Each server gets a free loopback port, logs to a file, and is stopped by its
PID (SIGTERM, then SIGKILL) when the block ends. `binary()` finds or builds
llama-server through scripts/llama-server.sh.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from tests.tinymodel import ModelSpec, write_model

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "llama-server.sh"


class LlamaServerUnavailable(RuntimeError):
    """No llama-server binary could be found or built."""


@functools.cache
def binary() -> str:
    done = subprocess.run([str(BUILD_SCRIPT)], capture_output=True, text=True)
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode != 0 or not os.access(path, os.X_OK):
        raise LlamaServerUnavailable(f"{BUILD_SCRIPT} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return path


@functools.cache
def tiny_model(kind: str = "chat", seed: int = 0) -> Path:
    """A generated model file, written once per process into a temporary directory."""
    directory = Path(tempfile.mkdtemp(prefix="olla-models-"))
    return write_model(directory / f"tiny-{kind}-{seed}.gguf", ModelSpec(kind=kind, seed=seed))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ServerSpec:
    model: Path
    alias: str | None = None
    slots: int = 2
    ctx_per_slot: int = 1024
    embeddings: bool = True
    metrics: bool = True
    api_key: str | None = None
    threads: int = 1
    extra_args: tuple[str, ...] = ()


@dataclass
class LlamaServer:
    spec: ServerSpec
    port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        s = self.spec
        args = [binary(), "-m", str(s.model), "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["-np", str(s.slots), "-c", str(s.ctx_per_slot * s.slots), "-t", str(s.threads), "--no-warmup"]
        if s.alias:
            args += ["--alias", s.alias]
        if s.embeddings:
            args += ["--embeddings", "--pooling", "mean"]
        if s.metrics:
            args += ["--metrics"]
        if s.api_key:
            args += ["--api-key", s.api_key]
        return args + list(s.extra_args)

    def start(self) -> None:
        log = open(self.log_path, "wb")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll /health until 200; it answers 503 `Loading model` while loading."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited early:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.02)
        raise TimeoutError(f"llama-server on {self.url} not ready after {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.kill(self.process.pid, sig)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=5)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, limit: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return "(no log)"


class LlamaServers:
    """Start N llama-servers together; a context manager and a sequence of LlamaServer."""

    def __init__(self, specs: list[ServerSpec], log_dir: Path | None = None) -> None:
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="olla-llama-logs-"))
        self.servers = [
            LlamaServer(spec, free_port(), self.log_dir / f"llama-server-{i}.log") for i, spec in enumerate(specs)
        ]

    def __enter__(self) -> LlamaServers:
        try:
            for server in self.servers:
                server.start()
            for server in self.servers:
                server.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        for server in self.servers:
            server.stop()

    def logs(self) -> str:
        return "\n".join(f"===== {s.url} ({s.log_path})\n{s.log_tail()}" for s in self.servers)

    def __getitem__(self, index: int) -> LlamaServer:
        return self.servers[index]

    def __len__(self) -> int:
        return len(self.servers)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.servers)
