"""Cluster tools: ``python -m cluster <subcommand>``.

    python -m cluster plan --config configs/hstu_large_ml1m.yaml --gpu-memory 80GiB --gpus-per-node 8 --nodes 4

Subcommands register a subparser here and run a function from their own module (``plan``:
``cluster/plan.py``).
"""

from __future__ import annotations

import argparse
import sys

from cluster.plan import add_plan_parser


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n")[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(subparsers)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:  # config and input errors: one line, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
