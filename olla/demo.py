"""`olla serve --demo`: emulated llama.cpp servers in this process, and a router in front of them.

Two models on five endpoints of different speeds, slot counts and priorities,
so a newcomer can watch routing, priority tiers and failover with nothing
installed. The only place the router touches the emulator.
"""

from __future__ import annotations

from typing import Any

from olla.config import Config, parse_config
from olla.sim import SimConfig, SimFleet

CHAT = "llama-3.2-1b-instruct"
CODE = "qwen2.5-coder-1.5b"

# name, priority, emulated server
FLEET: tuple[tuple[str, int, SimConfig], ...] = (
    ("chat-fast-a", 100, SimConfig(model=CHAT, slots=4, prefill_ms=0.2, decode_ms=12.0, seed=1)),
    ("chat-fast-b", 100, SimConfig(model=CHAT, slots=4, prefill_ms=0.2, decode_ms=12.0, seed=2)),
    ("chat-slow", 50, SimConfig(model=CHAT, slots=2, prefill_ms=1.0, decode_ms=40.0, seed=3)),
    ("code-a", 100, SimConfig(model=CODE, slots=2, prefill_ms=0.3, decode_ms=20.0, seed=4)),
    ("code-b", 100, SimConfig(model=CODE, slots=2, prefill_ms=0.3, decode_ms=25.0, seed=5, load_seconds=3.0)),
)


async def start(host: str, port: int) -> tuple[SimFleet, Config]:
    """Start the emulated fleet on free loopback ports; return it and a router config naming it."""
    fleet = SimFleet([sim for _, _, sim in FLEET])
    await fleet.__aenter__()
    endpoints: list[dict[str, Any]] = [
        {"name": name, "url": url, "type": "llamacpp", "priority": priority, "check_interval": "1s",
         "check_timeout": "500ms"}
        for (name, priority, _), url in zip(FLEET, fleet.urls)
    ]  # fmt: skip
    raw = {
        "server": {"host": host, "port": port},
        "discovery": {"static": {"endpoints": endpoints}},
        "model_aliases": {"chat": [CHAT], "code": [CODE]},
        "logging": {"level": "info", "format": "text"},
    }
    return fleet, parse_config(raw, "<demo>")
