"""Sweeps: a grid of trainer configs, run as one Slurm job array or one after another locally.

    python -m cluster sweep --grid configs/sweeps/example.yaml            # sbatch a job array
    python -m cluster sweep --grid grid.yaml --local --nproc 2           # torchrun, one run at a time
    python -m cluster sweep --grid grid.yaml --sbatch-args "--cpus-per-task=8 --time=2:00:00" optim.lr=1e-3

A grid file::

    config: configs/demo.yaml            # the base trainer config (relative to the grid file)
    name: lr-blocks                      # the sweep's name: output_root/<name>/, the parent run's name
    experiment: sweeps                   # MLflow experiment of the parent and its children
    output_root: runs/sweeps             # each point trains in <output_root>/<name>/point-<i>
    overrides: [run.epochs=4]            # applied to every point (command-line overrides come after)
    grid:                                # the cartesian product of these, in this order
      optim.lr: [0.001, 0.003]
      model.num_blocks: [1, 2]

Every point is a child of one MLflow parent run (tag ``mlflow.parentRunId``, via
``tracking.parent_run_id``), created here before anything is submitted. The tracking store is the
grid's ``tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<sweep dir>/mlflow.db``,
which is what every point's trainer uses too (its output dir's parent). Concurrent array tasks
should share a tracking server (slurm/mlflow_server.sbatch), not one SQLite file.

With Slurm, the points are written to ``<sweep dir>/points.txt`` (one line of overrides each) and
``slurm/train.sbatch`` is submitted as ``--array=0-<n-1>``; task i reads line i (``SWEEP_POINTS``).
A dependent job (``afterany``) then runs ``python -m cluster report``, which writes the comparison
and closes the parent run. Locally, the report runs after the last point.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.config import ConfigError

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class SweepSpec:
    """A parsed grid file."""

    config: Path
    name: str
    experiment: str
    output_root: Path
    overrides: list[str] = field(default_factory=list)
    grid: dict[str, list] = field(default_factory=dict)
    tracking_uri: str | None = None

    @property
    def sweep_dir(self) -> Path:
        return self.output_root / self.name

    def points(self) -> list[list[str]]:
        """One list of ``key=value`` overrides per grid point (cartesian product, in file order)."""
        keys = list(self.grid)
        return [
            [f"{k}={_value_text(v)}" for k, v in zip(keys, values)]
            for values in itertools.product(*(self.grid[k] for k in keys))
        ]

    def resolved_tracking_uri(self) -> str:
        """The store the parent and all children use."""
        return (
            self.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{self.sweep_dir.resolve() / 'mlflow.db'}"
        )


def _value_text(value) -> str:
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def load_grid(path: str | os.PathLike) -> SweepSpec:
    """Read and check a grid file; ``ConfigError`` names the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("--grid", f"{path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "expected a mapping with config, name, grid")
    allowed = {"config", "name", "experiment", "output_root", "overrides", "grid", "tracking_uri"}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}", f"unknown key; allowed: {', '.join(sorted(allowed))}")
    for key in ("config", "grid"):
        if key not in raw:
            raise ConfigError(f"{path}: {key}", "is required")
    grid = raw["grid"]
    if not isinstance(grid, dict) or not grid:
        raise ConfigError(f"{path}: grid", "expected a non-empty mapping of config key -> list of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key}", f"expected a non-empty list of values, got {values!r}")
    config = Path(raw["config"])
    if not config.is_absolute():
        config = (path.parent / config) if (path.parent / config).is_file() else config
    if not config.is_file():
        raise ConfigError(
            f"{path}: config", f"{raw['config']} is not a file (relative to the grid file or cwd)"
        )
    overrides = raw.get("overrides") or []
    if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
        raise ConfigError(f"{path}: overrides", "expected a list of key=value strings")
    name = str(raw.get("name") or path.stem)
    return SweepSpec(
        config=config.resolve(),
        name=name,
        experiment=str(raw.get("experiment") or name),
        output_root=Path(raw.get("output_root") or "runs/sweeps").resolve(),
        overrides=overrides,
        grid=grid,
        tracking_uri=raw.get("tracking_uri"),
    )


def point_overrides(
    spec: SweepSpec, index: int, point: list[str], parent_run_id: str, extra: list[str]
) -> list[str]:
    """All overrides of point ``index``: common ones, the point's, then where it logs and writes."""
    return [
        *spec.overrides,
        *extra,
        *point,
        f"run.output_dir={spec.sweep_dir / f'point-{index}'}",
        f"tracking.experiment={spec.experiment}",
        f"tracking.run_name={spec.name}-{index}",
        f"tracking.parent_run_id={parent_run_id}",
    ]


def create_parent_run(spec: SweepSpec, points: list[list[str]]) -> str:
    """The MLflow run every point is a child of; returns its id."""
    from mlflow import MlflowClient

    from train.tracking import MLflowTracker, TrackingConfig

    uri = spec.resolved_tracking_uri()
    cfg = TrackingConfig(experiment=spec.experiment, run_name=spec.name, system_metrics=False)
    # MLflowTracker creates (or, for a sweep dir used before, reopens) the run and its experiment.
    tracker = MLflowTracker(cfg, run_dir=spec.sweep_dir, tracking_uri=uri)
    client: MlflowClient = tracker.client
    tracker.set_tags(
        {"sweep": "parent", "sweep.num_points": str(len(points)), "sweep.config": str(spec.config)}
    )
    tracker.log_params({f"grid.{k}": v for k, v in spec.grid.items()})
    client.log_dict(tracker.run_id, {"config": str(spec.config), "overrides": spec.overrides, "grid": spec.grid,
                                     "points": points}, "sweep.json")  # fmt: skip
    return tracker.run_id


def run_sweep(
    spec: SweepSpec,
    *,
    local: bool,
    nproc: int,
    extra: list[str],
    sbatch_args: list[str],
    dry_run: bool = False,
) -> dict:
    """Create the parent run, then run (``local``) or submit every point; returns what was done."""
    points = spec.points()
    spec.sweep_dir.mkdir(parents=True, exist_ok=True)
    parent = create_parent_run(spec, points)
    uri = spec.resolved_tracking_uri()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    env.setdefault("OMP_NUM_THREADS", "1")
    lines = [shlex.join(point_overrides(spec, i, p, parent, extra)) for i, p in enumerate(points)]
    (spec.sweep_dir / "points.txt").write_text("\n".join(lines) + "\n")
    info = {"parent_run_id": parent, "tracking_uri": uri, "sweep_dir": str(spec.sweep_dir), "points": points}
    report_cmd = [sys.executable, "-m", "cluster", "report", spec.experiment, "--parent", parent,
                  "--tracking-uri", uri, "--out", str(spec.sweep_dir / "report"), "--finish-parent"]  # fmt: skip
    if local:
        failures = 0
        for i, line in enumerate(lines):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                   "-m", "train", "--config", str(spec.config), *shlex.split(line)]  # fmt: skip
            logger.info("sweep point %d/%d: %s", i + 1, len(lines), " ".join(points[i]))
            if dry_run:
                continue
            # Children print to stderr: this command's stdout is its JSON summary alone.
            if subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr).returncode != 0:
                failures += 1
                logger.error("sweep point %d failed; going on with the next", i)
        if not dry_run:
            subprocess.run(report_cmd, cwd=ROOT, env=env, check=False, stdout=sys.stderr)
        info["failures"] = failures
        return info
    sbatch = ["sbatch", "--parsable", f"--array=0-{len(lines) - 1}", f"--job-name={spec.name}",
              "--export=ALL", *sbatch_args, str(ROOT / "slurm" / "train.sbatch"), str(spec.config)]  # fmt: skip
    env["SWEEP_POINTS"] = str(spec.sweep_dir / "points.txt")
    env["GENREC_ROOT"] = str(ROOT)
    info["sbatch"] = sbatch
    if dry_run:
        return info
    array_id = _submit(sbatch, env)
    report_job = _submit(["sbatch", "--parsable", f"--dependency=afterany:{array_id}", f"--job-name={spec.name}-report",
                          f"--output={spec.sweep_dir / 'report-%j.out'}", "--export=ALL",
                          f"--wrap={shlex.join(report_cmd)}"], env)  # fmt: skip
    info.update(array_job_id=array_id, report_job_id=report_job)
    (spec.sweep_dir / "sweep.json").write_text(json.dumps(info, indent=2) + "\n")
    logger.info("submitted job array %s (%d points) and report job %s; parent run %s at %s",
                array_id, len(lines), report_job, parent, uri)  # fmt: skip
    return info


def _submit(cmd: list[str], env: dict) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def main(args) -> int:
    """``python -m cluster sweep`` (arguments parsed in cluster/__main__.py)."""
    spec = load_grid(args.grid)
    info = run_sweep(
        spec,
        local=args.local,
        nproc=args.nproc,
        extra=list(args.overrides),
        sbatch_args=shlex.split(args.sbatch_args or ""),
        dry_run=args.dry_run,
    )
    print(json.dumps(info, indent=2))
    return 1 if info.get("failures") else 0
