"""Compare the runs of an experiment (or of one sweep) in one table and one plot.

    python -m cluster report EXPERIMENT [--parent RUN_ID] [--tracking-uri URI] [--out DIR]

Rows are the experiment's runs (only the children of ``--parent`` when given; parent runs themselves
are left out). Columns: run name, status, every param whose value differs between the runs, the
final test metrics (HR@10, NDCG@10 and MRR as logged at the end of training, named as in MLflow:
``test/hr_at_10``), the mean train tokens/s and the
wall time (MLflow start to end; a requeued run counts from its first start). The table is printed
and written to ``<out>/runs.csv``; ``<out>/comparison.png`` plots the test metrics and tokens/s per
run. With ``--parent`` both are also logged to the parent run (``report/``), and
``--finish-parent`` ends the parent run (FINISHED, or FAILED when a child did not finish).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

PARENT_TAG = "mlflow.parentRunId"
TOKENS_METRIC = "train/tokens_per_s"


@dataclass
class RunRow:
    """One run's line of the report."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    test: dict[str, float]
    tokens_per_s: float | None
    wall_s: float | None


def collect_runs(client, experiment: str, parent: str | None = None) -> list[RunRow]:
    """The runs of ``experiment`` (children of ``parent`` when given), oldest first."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"no MLflow experiment {experiment!r} at {client.tracking_uri}; there are: {', '.join(names)}"
        )
    runs = client.search_runs([exp.experiment_id], max_results=5000, order_by=["attributes.start_time ASC"])
    parents = {r.data.tags.get(PARENT_TAG) for r in runs}
    if parent:
        runs = [r for r in runs if r.data.tags.get(PARENT_TAG) == parent]
    else:
        runs = [r for r in runs if r.info.run_id not in parents]
    rows = []
    for r in runs:
        history = client.get_metric_history(r.info.run_id, TOKENS_METRIC)
        tokens = sum(m.value for m in history) / len(history) if history else None
        wall = (r.info.end_time - r.info.start_time) / 1000 if r.info.end_time and r.info.start_time else None
        rows.append(
            RunRow(
                run_id=r.info.run_id,
                name=r.info.run_name or r.info.run_id[:8],
                status=r.info.status,
                params=dict(r.data.params),
                test={
                    k[len("test/") :]: v for k, v in sorted(r.data.metrics.items()) if k.startswith("test/")
                },
                tokens_per_s=tokens,
                wall_s=wall,
            )
        )
    return rows


def differing_params(rows: list[RunRow]) -> list[str]:
    """Param keys whose values are not the same in every run (a missing key counts as a value)."""
    keys = sorted(set().union(*(r.params for r in rows))) if rows else []
    skip = ("run.output_dir", "tracking.run_name", "tracking.parent_run_id")
    return [k for k in keys if k not in skip and len({r.params.get(k) for r in rows}) > 1]


def table(rows: list[RunRow], metrics: list[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and string cells of the comparison table."""
    params = differing_params(rows)
    metrics = metrics or sorted({k for r in rows for k in r.test})
    header = ["run", "status", *params, *(f"test/{m}" for m in metrics), "tokens/s", "wall_s"]
    body = []
    for r in rows:
        cells = [r.name, r.status, *(r.params.get(p, "") for p in params)]
        cells += [f"{r.test[m]:.4f}" if m in r.test else "" for m in metrics]
        cells += [
            f"{r.tokens_per_s:.0f}" if r.tokens_per_s is not None else "",
            f"{r.wall_s:.1f}" if r.wall_s else "",
        ]
        body.append(cells)
    return header, body


def format_table(header: list[str], body: list[list[str]]) -> str:
    """Fixed-width text, one run per line."""
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in body]
    return "\n".join(lines)


def plot(rows: list[RunRow], path: Path, metrics: list[str]) -> Path:
    """Bars: each test metric per run (left), mean tokens/s per run (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.5))
    x = np.arange(len(rows))
    width = 0.8 / max(1, len(metrics))
    for j, m in enumerate(metrics):
        ax_m.bar(x + j * width, [r.test.get(m, np.nan) for r in rows], width, label=m)
    ax_m.set_xticks(x + 0.4 - width / 2, [r.name for r in rows], rotation=30, ha="right")
    ax_m.set_title("final test metrics")
    ax_m.legend(fontsize=8)
    ax_t.bar(x, [r.tokens_per_s or 0.0 for r in rows], color="tab:gray")
    ax_t.set_xticks(x, [r.name for r in rows], rotation=30, ha="right")
    ax_t.set_title("train tokens/s (mean)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report(experiment: str, *, tracking_uri: str | None = None, parent: str | None = None,
           out: str | os.PathLike = "runs/report", finish_parent: bool = False) -> str:  # fmt: skip
    """Build, print-ready, the table; write runs.csv and comparison.png; log them to the parent."""
    from mlflow import MlflowClient

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ValueError("no tracking store: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    client = MlflowClient(tracking_uri=uri)
    rows = collect_runs(client, experiment, parent)
    if not rows:
        raise ValueError(
            f"experiment {experiment!r} has no runs" + (f" under parent {parent}" if parent else "")
        )
    # MLflow's names (train/tracking.py metric_key: hr@10 -> hr_at_10); the headline ones when present.
    metrics = [m for m in ("hr_at_10", "ndcg_at_10", "mrr") if any(m in r.test for r in rows)] or sorted(
        {k for r in rows for k in r.test}
    )[:4]
    header, body = table(rows, metrics)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "runs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["run_id", *header])
        writer.writerows([r.run_id, *cells] for r, cells in zip(rows, body))
    png = plot(rows, out / "comparison.png", metrics)
    if parent:
        client.log_artifact(parent, str(out / "runs.csv"), "report")
        client.log_artifact(parent, str(png), "report")
        if finish_parent:
            ok = all(r.status == "FINISHED" for r in rows)
            client.set_terminated(parent, "FINISHED" if ok else "FAILED")
    return format_table(header, body)


def main(args) -> int:
    """``python -m cluster report`` (arguments parsed in cluster/__main__.py)."""
    text = report(args.experiment, tracking_uri=args.tracking_uri, parent=args.parent, out=args.out,
                  finish_parent=args.finish_parent)  # fmt: skip
    print(text)
    print(f"\nwritten: {Path(args.out) / 'runs.csv'}, {Path(args.out) / 'comparison.png'}")
    return 0
