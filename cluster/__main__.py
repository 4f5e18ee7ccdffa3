"""Cluster command line.

    python -m cluster plan --config FILE --gpu-memory 80GiB --gpus-per-node 8 --nodes 4 [--json OUT]
    python -m cluster sweep --grid FILE [--local --nproc 2] [--sbatch-args "..."] [key=value ...]
    python -m cluster report EXPERIMENT [--parent RUN_ID] [--tracking-uri URI] [--out DIR]

``plan`` chooses a schedule (sharding, ZeRO, offload, checkpointing, token budget) that fits the
GPUs (cluster/plan.py). ``sweep`` runs a grid of trainer configs as one Slurm job array (or one after another with torchrun,
``--local``), every run a child of one MLflow parent run (cluster/sweep.py). ``report`` prints an
experiment's or a sweep's runs as one table and writes a comparison plot (cluster/report.py).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cluster.config import ConfigError
from cluster.log import setup_logging
from cluster.plan import add_plan_parser


def build_parser() -> argparse.ArgumentParser:
    """The argparse dispatcher: one subparser per command."""
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_plan_parser(sub)

    sweep = sub.add_parser("sweep", help="run a grid of trainer configs (Slurm job array or --local)")
    sweep.add_argument("--grid", required=True, help="grid YAML file (see cluster/sweep.py)")
    sweep.add_argument("--local", action="store_true", help="run the points one after another with torchrun")
    sweep.add_argument("--nproc", type=int, default=1, help="processes per point with --local (default 1)")
    sweep.add_argument("--sbatch-args", default="", help='extra sbatch options, e.g. "--cpus-per-task=8"')
    sweep.add_argument("--dry-run", action="store_true", help="create the parent run and points, run nothing")
    sweep.add_argument("overrides", nargs="*", help="key.sub=value applied to every point")

    report = sub.add_parser("report", help="compare the runs of an experiment or sweep")
    report.add_argument("experiment", help="MLflow experiment name")
    report.add_argument("--parent", help="only the children of this parent run (a sweep)")
    report.add_argument("--tracking-uri", help="default: $MLFLOW_TRACKING_URI")
    report.add_argument("--out", default="runs/report", help="where runs.csv and comparison.png go")
    report.add_argument("--finish-parent", action="store_true", help="end the parent run (sweep jobs do)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse and dispatch; user errors become one line and exit code 2."""
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        if args.command == "plan":  # exit codes: 0 a plan fits, 2 nothing fits, 1 bad input
            try:
                return args.func(args)
            except ValueError as exc:
                logging.getLogger("cluster").error("%s", exc)
                return 1
        if args.command == "sweep":
            from cluster import sweep

            return sweep.main(args)
        from cluster import report

        return report.main(args)
    except (ConfigError, ValueError) as exc:
        logging.getLogger("cluster").error("%s", exc)
        return 2


if __name__ == "__main__":
    sys.exit(main())
