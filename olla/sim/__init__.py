"""An emulated llama.cpp llama-server, for testing and demonstrating the router.

It answers llama-server's routes with the same status codes and JSON shapes,
queues requests for its slots, caches prompts per slot and in a per-server RAM
prompt cache, takes time per token, and shows failures on demand. It imports
nothing from the router.
"""

from olla.sim.config import SimConfig
from olla.sim.faults import Fault
from olla.sim.fleet import SimFleet
from olla.sim.server import SimServer

__all__ = ["Fault", "SimConfig", "SimFleet", "SimServer"]
