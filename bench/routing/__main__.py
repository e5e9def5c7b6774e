"""`python -m bench.routing`: run every balancer at every load and write the report."""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from bench import routing
from bench.common import RESULTS
from bench.routing.fleet import serve_fleet
from bench.routing.replay import cut_after, run_once
from bench.routing.report import Row, chart, report, table
from bench.routing.workload import LEVELS, SETUPS, capacity, system_prompt, trace


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.routing", description=routing.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=40.0, help="seconds of arrivals per run (default 40)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (8 s per run), written to a temp dir")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output", type=Path, help="results directory (default bench/results)")
    parser.add_argument("--serve-fleet", type=float, metavar="LIFETIME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fleet is not None:
        asyncio.run(serve_fleet(args.serve_fleet))
        return
    if args.quick:
        args.duration = min(args.duration, 8.0)
    output = args.output or (Path(tempfile.mkdtemp(prefix="olla-routing-")) if args.quick else RESULTS)
    began = time.monotonic()
    cap = capacity(args.seed)
    system = system_prompt(args.seed)
    rows: list[Row] = []
    for level in LEVELS:
        requests = trace(args.seed, level * cap.fleet, args.duration)
        for setup in SETUPS:
            run = run_once(setup, level, system, requests, cut_after(args.duration))
            rows.append(Row(run))
            print(table([rows[-1]])[-1], flush=True)
    output.mkdir(parents=True, exist_ok=True)
    chart(rows, output / "routing.png")
    (output / "routing.md").write_text(report(args, cap, rows, time.monotonic() - began, output))
    print(f"wrote {output / 'routing.md'} and routing.png in {(time.monotonic() - began) / 60:.1f} min")


if __name__ == "__main__":
    main()
