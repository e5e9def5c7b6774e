"""Chaos and soak: a real router in front of an emulated fleet, clients streaming, an adversary breaking things.

    .venv/bin/python -m bench.chaos [--duration 600] [--seed 1] [--clients 16] [--pace 2]

See bench/README.md; `run(Options(...))` is what tests/test_chaos.py calls.
"""

from bench.chaos.harness import Options, Run, run

__all__ = ["Options", "Run", "run"]
