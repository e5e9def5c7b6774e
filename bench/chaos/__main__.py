"""`python -m bench.chaos`: one chaos run, its report on stdout (and in a file), exit 1 when a criterion fails."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from bench.chaos import Options, run
from bench.chaos.report import report
from bench.common import RESULTS


def main() -> int:
    defaults = Options()
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--duration", type=float, default=defaults.duration, help="seconds of chaos (%(default)g)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="fixes every random choice (%(default)s)")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients (%(default)s)")
    parser.add_argument("--pace", type=float, default=defaults.pace,
                        help="mean seconds between two adversary actions (%(default)g)")  # fmt: skip
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="also write the report here (default: bench/results/chaos.md for a default-length run)",
    )
    args = parser.parse_args()
    options = Options(duration=args.duration, seed=args.seed, clients=args.clients, pace=args.pace)
    output = args.output or (RESULTS / "chaos.md" if options.duration == defaults.duration else None)
    print(f"chaos: seed {options.seed}, {options.duration:g} s, {options.clients} clients", file=sys.stderr, flush=True)
    result = run(options)
    text = report(result, shlex.join([".venv/bin/python", "-m", "bench.chaos", *sys.argv[1:]]))
    print(text)
    if output is not None:
        output.write_text(text)
        print(f"wrote {output}", file=sys.stderr)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
