"""What the benchmarks share: where results go, child processes, and a router to measure."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.llamacpp import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


async def wait_http(url: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise TimeoutError(url)


@contextlib.contextmanager
def process(args: list[str], **popen: Any) -> Iterator[subprocess.Popen[Any]]:
    """A child process, silent unless `popen` says otherwise; terminated (then killed) when the block ends."""
    popen.setdefault("stdout", subprocess.DEVNULL)
    popen.setdefault("stderr", subprocess.DEVNULL)
    proc = subprocess.Popen(args, **popen)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def router(config: dict[str, Any]) -> Iterator[str]:
    """`python -m olla serve` with this config on a free loopback port; yields its base URL once it answers."""
    port = free_port()
    server = {**config.get("server", {}), "host": "127.0.0.1", "port": port}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "bench.yaml"
        path.write_text(yaml.safe_dump({**config, "server": server}))
        with process([sys.executable, "-m", "olla", "serve", "-c", str(path)]):
            base = f"http://127.0.0.1:{port}"
            asyncio.run(wait_http(base + "/internal/health"))
            yield base
