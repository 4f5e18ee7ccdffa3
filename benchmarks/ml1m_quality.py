"""Quality report of finished (or new) runs beside published rows: ML-1M or Amazon Beauty (``--dataset``).

    python benchmarks/ml1m_quality.py                       # ML-1M: sasrec, hstu, hstu_large, each config's epochs
    python benchmarks/ml1m_quality.py --models gru4rec bert4rec sasrec hstu   # the lineage on one protocol
    python benchmarks/ml1m_quality.py --models hstu --epochs 40 --nproc 2
    python benchmarks/ml1m_quality.py --report-only         # table from finished runs in runs/
    python benchmarks/ml1m_quality.py --report-only --run hstu=runs/hstu_full_tv   # any run directory
    python benchmarks/ml1m_quality.py --dataset beauty --models gru4rec bert4rec tiger
    python benchmarks/ml1m_quality.py --dataset beauty --report-only --models --run sasrec=runs/sasrec_beauty

Without ``--report-only`` it prepares the data set when its prepared folder is missing (ML-1M from
../shared/data/ml-1m with configs/data/ml1m.yaml; Beauty with configs/data/amazon_beauty.yaml) and
runs ``torchrun -m train --config configs/<model>_<dataset>.yaml`` per model (output in
runs/<model>_<dataset>). Then it prints one row per run beside the published rows of the data set
(ML-1M: the HSTU repository's HR@10/50/200 and NDCG@10; Beauty: the TIGER paper's Table 1, Recall@k =
our hr@k with one target) with, per run: the loss (function and negatives), the training split,
epochs and the best epoch (the selected checkpoint's, or the best point of a test curve), wall time,
the median training tokens/s, and the parameter counts (dense, tables, total) when the run recorded
them. Writes benchmarks/results/<dataset>_quality.json (the rows and every run's HR@10 curve) and a
plot of HR@10 against wall time (and against epoch) for every run, benchmarks/results/<dataset>_quality.png.

``--archive FILE`` (a JSON this script wrote) adds the rows and curves of runs whose directories are
gone: run directories do not outlive a machine, so the results docs keep the report's JSON beside
their plots (docs/*_lineage_runs.json) and the tables and plots can be redrawn with new runs added:

    python benchmarks/ml1m_quality.py --report-only --models --archive docs/ml1m_lineage_runs.json \
        --run bert4rec=runs/bert4rec_ml1m

The curve of a run is the split it evaluated during training: test under ``data.train_split=
train_valid`` (ML-1M's reference protocol: a curve only, never a decision) and valid under
``data.train_split=train`` (Beauty's protocol: select on valid, test once at the end). The plot
labels which; published lines are test numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from train.config import load_train_config

ROOT = Path(__file__).resolve().parents[1]

PUBLISHED = {  # HSTU repository, ML-1M, leave-one-out, all items ranked, history excluded
    "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "hr@200": 0.7528},
    "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720, "hr@50": 0.5754, "hr@200": 0.7716},
    "hstu_large": {"hr@10": 0.3294, "ndcg@10": 0.1893, "hr@50": 0.5935, "hr@200": 0.7839},
    # The same table quotes these two from the 2023 reproduction study ("Turning Dross Into Gold Loss").
    "gru4rec": {"hr@10": 0.2811, "ndcg@10": 0.1648},
    "bert4rec": {"hr@10": 0.2843, "ndcg@10": 0.1537},
}
KEYS = ["hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"]

PUBLISHED_BEAUTY = {  # TIGER paper (Rajput et al., NeurIPS 2023) Table 1, leave-one-out, all items
    "gru4rec": {"hr@10": 0.0283, "ndcg@10": 0.0137},
    "bert4rec": {"hr@10": 0.0347, "ndcg@10": 0.0170},
    "sasrec": {"hr@5": 0.0387, "hr@10": 0.0605, "ndcg@5": 0.0249, "ndcg@10": 0.0318},
    "tiger": {"hr@5": 0.0454, "hr@10": 0.0648, "ndcg@5": 0.0321, "ndcg@10": 0.0384},
}


class Dataset(NamedTuple):
    """What the report needs to know about one data set (a NamedTuple: the script is also loaded as a
    module by path, and dataclasses need their module registered)."""

    title: str
    suffix: str  # configs/<model>_<suffix>.yaml, runs/<model>_<suffix>
    published: dict[str, dict[str, float]]
    keys: list[str]  # the table's metric columns, keys of final_metrics.json's "test"
    prepare_config: str
    prepared_dir: str
    default_models: list[str]
    # Models reported without a published row (e.g. HSTU on Beauty).
    unpublished: tuple[str, ...] = ()
    # A test curve's first time at these models' published HR@10 is noted per run (ML-1M).
    reach_targets: tuple[str, ...] = ()

    @property
    def models(self) -> list[str]:
        return [*self.published, *self.unpublished]


DATASETS = {
    "ml1m": Dataset("ML-1M", "ml1m", PUBLISHED, KEYS, "configs/data/ml1m.yaml", "data/prepared/ml1m",
                    ["sasrec", "hstu", "hstu_large"], reach_targets=("hstu", "hstu_large")),
    "beauty": Dataset("Amazon Beauty", "beauty", PUBLISHED_BEAUTY, ["hr@5", "hr@10", "ndcg@5", "ndcg@10"],
                      "configs/data/amazon_beauty.yaml", "data/prepared/amazon_beauty",
                      ["gru4rec", "bert4rec", "tiger"], unpublished=("hstu",)),
}  # fmt: skip


def run_model(name: str, dataset: Dataset, nproc: int, overrides: list[str]) -> dict:
    config = ROOT / "configs" / f"{name}_{dataset.suffix}.yaml"
    if not config.is_file():
        raise SystemExit(
            f"--models {name}: no {config.relative_to(ROOT)}; train it by hand and pass --run {name}=DIR"
        )
    out = ROOT / "runs" / f"{name}_{dataset.suffix}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train",
           "--config", str(config.relative_to(ROOT)), f"run.output_dir={out}", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"seconds": time.perf_counter() - t0}


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records in order ([] when it has none)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve_points(
    records: list[dict], split: str, key: str
) -> list[tuple[int, int | None, float | None, float]]:
    """``[(step, epoch, elapsed seconds, value), ...]`` of ``<split>/<key>`` in ``records``; the epoch is
    the last logged ``train/epoch`` before the point, rounded (evaluations run at epoch ends)."""
    points, epoch = [], None
    for rec in records:
        epoch = rec.get("train/epoch", epoch)
        if f"{split}/{key}" in rec:
            points.append((rec.get("step"), round(epoch) if epoch is not None else None, rec.get("elapsed_s"),
                           rec[f"{split}/{key}"]))  # fmt: skip
    return points


def time_to(
    curve: list[tuple[int | None, float | None, float]], target: float
) -> tuple[float | None, int | None]:
    """(elapsed seconds, epoch) of the first point of ``curve`` (``(epoch, elapsed seconds, value)``)
    at or above ``target``; (None, None) if none."""
    for epoch, seconds, value in curve:
        if value >= target and seconds is not None:
            return seconds, epoch
    return None, None


def curve_split(train_split: str) -> str:
    """The split a run evaluated during training: test under train_valid (a curve only), else valid."""
    return "test" if train_split == "train_valid" else "valid"


def median_tokens_per_s(records: list[dict]) -> float | None:
    """Median ``train/tokens_per_s`` over the logged windows after the first (which includes warm-up)."""
    values = [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r]
    values = values[1:] if len(values) > 1 else values
    return statistics.median(values) if values else None


def run_input(config) -> str:
    """The raw file a run's data was prepared from (its manifest), e.g. ``ratings.dat`` or ``sequences.txt``."""
    manifest = Path(config.data.dir) / "manifest.json"
    if not manifest.is_file():
        return "?"
    paths = json.loads(manifest.read_text())["config"]["input"]["paths"]
    return ",".join(Path(p).name for p in paths)


def run_row(name: str, run_dir: Path, dataset: Dataset) -> dict:
    """One table row of a finished run (its final_metrics.json, config.yaml and metrics.jsonl)."""
    final = json.loads((run_dir / "final_metrics.json").read_text())
    config = load_train_config(run_dir / "config.yaml")  # the run's resolved config
    records = read_records(run_dir)  # metrics.jsonl is read once per run
    train_split = final.get("train_split", "train")
    split = curve_split(train_split)
    points = curve_points(records, split, "hr@10")
    curve = [p[1:] for p in points]
    best = max(curve, key=lambda point: point[2], default=(None, None, None))
    # The selected checkpoint's epoch (train split: the valid point at best_step); none under train_valid.
    best_step = final.get("best_step", -1)
    selected = next(
        (p for p in points if best_step is not None and best_step >= 0 and p[0] == best_step), None
    )
    on_test = split == "test"  # published numbers are test numbers: compare test curves only
    published_hr10 = dataset.published.get(name, {}).get("hr@10")
    seconds, epoch = time_to(curve, published_hr10) if on_test and published_hr10 else (None, None)
    reached = {
        t: time_to(curve, dataset.published[t]["hr@10"])[0] if on_test else None
        for t in dataset.reach_targets
    }
    return {"model": name, "source": _source(run_dir), **{k: final["test"].get(k) for k in dataset.keys},
            "epochs": final.get("epochs"), "best_epoch": selected[1] if selected else None,
            "negatives": config.loss.describe(), "loss_function": config.loss.function,
            "table_optimizer": config.embeddings.optimizer, "train_split": train_split, "curve_split": split,
            "elapsed_s": final.get("elapsed_s"), "tokens_per_s": median_tokens_per_s(records),
            "params": final.get("params"),
            "published_hr@10_reached_s": seconds, "published_hr@10_reached_epoch": epoch,
            **{f"{t}_hr@10_reached_s": s for t, s in reached.items()},
            "seed": config.run.seed, "input": run_input(config),
            "time_gap_from": getattr(config.model, "time_gap_from", None),
            "best_curve_hr@10": best[2], "best_curve_epoch": best[0]}  # fmt: skip


def _source(run_dir: Path) -> str:
    return str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT) else str(run_dir)


def build_rows(runs: list[tuple[str, Path]], dataset: Dataset, archived: list[dict] = ()) -> list[dict]:
    """One row per finished run (model name, run dir) and per ``archived`` row (``read_archive``), each
    model's published row after its runs."""
    rows = []
    for name in dict.fromkeys([*(name for name, _ in runs), *(r["model"] for r in archived)]):
        rows.extend(r for r in archived if r["model"] == name)
        for model, run_dir in runs:
            if model != name:
                continue
            if not (run_dir / "final_metrics.json").is_file():  # say why a run is missing from the table
                why = "not finished; its curve, if any, is in the plot" if run_dir.is_dir() else "no such run"
                print(f"{run_dir}: no final_metrics.json ({why})")
                continue
            rows.append(run_row(name, run_dir, dataset))
        if name in dataset.published:
            rows.append({"model": name, "source": "published", **dataset.published[name]})
    return rows


def _notes(r: dict, dataset: Dataset) -> str:
    if r["source"] == "published":
        return ""
    selected = f"best_epoch={r['best_epoch']}" if r["best_epoch"] is not None else "tested the last model"
    notes = (f"loss={r['negatives']} epochs={r['epochs']} {selected} table={r['table_optimizer']} "
             f"train_split={r['train_split']}")  # fmt: skip
    if r["elapsed_s"]:
        notes += f" time={r['elapsed_s'] / 60:.0f}min"
    if r["tokens_per_s"] is not None:
        notes += f" tokens/s={r['tokens_per_s']:.0f}"
    if r["params"]:
        p = r["params"]
        millions = {k: f"{v / 1e6:.3f}M" for k, v in p.items()}
        notes += f" params={millions['total']} (dense {millions['dense']} + tables {millions['tables']})"
    if r["best_curve_hr@10"] is not None:
        notes += f" best {r['curve_split']} HR@10 {r['best_curve_hr@10']:.4f} (epoch {r['best_curve_epoch']})"
    notes += f" input={r['input']} seed={r['seed']}"
    if r["time_gap_from"] is not None:
        notes += f" time_gap_from={r['time_gap_from']}"
    for target in dataset.reach_targets:
        if r.get(f"{target}_hr@10_reached_s") is not None:
            notes += f" {dataset.published[target]['hr@10']} at {r[f'{target}_hr@10_reached_s'] / 60:.0f}min"
    if r["published_hr@10_reached_s"] is not None:
        notes += (f" published HR@10 reached at epoch {r['published_hr@10_reached_epoch']}, "
                  f"{r['published_hr@10_reached_s'] / 60:.0f}min")  # fmt: skip
    return notes


def format_table(rows: list[dict], dataset: Dataset) -> str:
    """The rows as a fixed-width table: the data set's metrics, then the run's notes."""
    width = max([len("source"), *(len(r["source"]) for r in rows)])
    header = f"{'model':11s} {'source':{width}s} " + " ".join(f"{k:>8s}" for k in dataset.keys) + "  notes"
    lines = [f"{dataset.title} (test; Recall@k = hr@k with one target)", header, "-" * len(header)]
    for r in rows:
        cells = " ".join(f"{r[k]:8.4f}" if r.get(k) is not None else f"{'':8s}" for k in dataset.keys)
        lines.append(f"{r['model']:11s} {r['source']:{width}s} {cells}  {_notes(r, dataset)}".rstrip())
    return "\n".join(lines)


def report(
    runs: list[tuple[str, Path]], dataset: Dataset = DATASETS["ml1m"], archived: list[dict] = ()
) -> list[dict]:
    """Print the table of ``runs`` (and ``archived`` rows) beside the published rows; return its rows."""
    rows = build_rows(runs, dataset, archived)
    print(format_table(rows, dataset))
    return rows


def seed_summary(rows: list[dict], keys: list[str] = KEYS) -> list[dict]:
    """Mean and sample standard deviation over runs that differ only by seed (same model, input, time
    protocol, epochs, loss, split): one line per group with two or more seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["source"] != "published":
            key = (r["model"], r["input"], r["time_gap_from"], r["epochs"], r["negatives"], r["train_split"])
            groups.setdefault(key, []).append(r)
    out = []
    for (model, source, gap, epochs, _negatives, _split), group in groups.items():
        if len(group) < 2:
            continue
        line = {"model": model, "input": source, "time_gap_from": gap, "epochs": epochs, "seeds":
                [r["seed"] for r in group]}  # fmt: skip
        for k in keys:
            values = [r[k] for r in group]
            line[k] = statistics.mean(values)
            line[f"{k}_std"] = statistics.stdev(values)
        out.append(line)
        print(
            f"{model:11s} {len(group)} seeds {line['seeds']} input={source} time_gap_from={gap} epochs={epochs}: "
            + " ".join(
                f"{k} {line[k]:.4f}+-{line[k + '_std']:.4f}" for k in keys if k in ("hr@10", "ndcg@10", "mrr")
            )
        )
    return out


def curves_by_run(runs: list[tuple[str, Path]], key: str) -> list[dict]:
    """Per run with a curve: its model, source, label, split, and ``[(epoch, minutes, value)]`` of
    ``<split>/<key>``."""
    out = []
    for name, run_dir in runs:
        records = read_records(run_dir)
        config_path = run_dir / "config.yaml"
        train_split = load_train_config(config_path).data.train_split if config_path.is_file() else "train"
        split = curve_split(train_split)
        points = [(e, s / 60, v) for _, e, s, v in curve_points(records, split, key) if s is not None]
        if points:
            out.append(
                {
                    "model": name,
                    "source": _source(run_dir),
                    "label": f"{name} ({split}): {run_dir.name}",
                    "split": split,
                    "points": points,
                }
            )
    return out


def read_archive(path: Path, dataset: Dataset, live_sources: set[str]) -> tuple[list[dict], list[dict]]:
    """``(rows, curves)`` of the runs in a JSON this script wrote, leaving out the published rows (the
    report adds its own) and runs also given live (their directory is the newer copy)."""
    try:
        archived = json.loads(path.read_text())
        rows, curves = archived["rows"], archived["curves"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SystemExit(
            f"--archive {path}: expected a JSON written by this script with 'rows' and 'curves' ({exc})"
        ) from None
    for item in [*rows, *curves]:
        if item.get("model") not in dataset.models:
            raise SystemExit(
                f"--archive {path}: model {item.get('model')!r} is not a model of --dataset {dataset.suffix} "
                f"({', '.join(dataset.models)}); was it written with another --dataset?"
            )
    keep = [r for r in rows if r["source"] != "published" and r["source"] not in live_sources]
    return keep, [c for c in curves if c["source"] not in live_sources]


def plot_curves(curves: list[dict], key: str, path: Path, dataset: Dataset = DATASETS["ml1m"]) -> Path | None:
    """``key`` against wall time (minutes) and against epoch, one line per curve (``curves_by_run``: its
    valid or test split, in the label), with each model's published test value as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not curves:
        return None
    fig = Figure(figsize=(13, 5))
    FigureCanvasAgg(fig)
    by_time, by_epoch = fig.subplots(1, 2, sharey=True)
    for c in curves:
        by_time.plot(
            [m for _, m, _ in c["points"]], [v for _, _, v in c["points"]], marker="o", ms=3, label=c["label"]
        )
        by_epoch.plot([e for e, _, _ in c["points"]], [v for _, _, v in c["points"]], marker="o", ms=3)
    # One dashed line per published value; values closer than 0.005 share a line and one label.
    published = sorted((dataset.published[name][key], name) for name in dict.fromkeys(c["model"] for c in curves)
                       if key in dataset.published.get(name, {}))  # fmt: skip
    groups: list[list[tuple[float, str]]] = []
    for value, name in published:
        if groups and value - groups[-1][0][0] < 0.005:
            groups[-1].append((value, name))
        else:
            groups.append([(value, name)])
    for group in groups:
        label = "published " + ", ".join(f"{name} {value}" for value, name in group) + " (test)"
        for ax in (by_time, by_epoch):
            ax.axhline(group[-1][0], ls="--", lw=1, color="gray")
            ax.text(0.01, group[-1][0], label, fontsize=8, va="bottom", transform=ax.get_yaxis_transform())
    splits = " and ".join(sorted({c["split"] for c in curves}))
    by_time.set_xlabel("wall time (minutes)")
    by_epoch.set_xlabel("epoch")
    by_time.set_ylabel(f"{splits} {key}")
    fig.suptitle(f"{dataset.title}: {key} during training ({splits} split, as each label says)")
    for ax in (by_time, by_epoch):
        ax.grid(alpha=0.3)
    by_time.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=list(DATASETS), default="ml1m")
    parser.add_argument("--models", nargs="*", default=None, help="default: the data set's usual models")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override run.epochs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--run", action="append", default=[], metavar="MODEL=DIR",
                        help="also report this run directory as MODEL (a model of the data set)")  # fmt: skip
    parser.add_argument("--archive", type=Path, action="append", default=[], metavar="FILE",
                        help="also report the runs of a JSON this script wrote (rows and curves)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, key.sub=value")
    args = parser.parse_args()
    dataset = DATASETS[args.dataset]
    models = dataset.default_models if args.models is None else args.models
    os.chdir(ROOT)
    for name in models:
        if name not in dataset.models:
            parser.error(
                f"--models {name}: expected one of {', '.join(dataset.models)} for --dataset {args.dataset}"
            )
    runs = [(name, ROOT / "runs" / f"{name}_{dataset.suffix}") for name in models]
    for item in args.run:
        model, _, run_dir = item.partition("=")
        if model not in dataset.models or not run_dir:
            parser.error(f"--run {item}: expected MODEL=DIR with MODEL one of {', '.join(dataset.models)}")
        runs.append((model, Path(run_dir).resolve()))
    if not args.report_only:
        if not (ROOT / dataset.prepared_dir / "manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", dataset.prepare_config],
                           check=True)  # fmt: skip
        extra = list(args.overrides) + ([f"run.epochs={args.epochs}"] if args.epochs else [])
        for name in models:
            run_model(name, dataset, args.nproc, extra)
    live = {_source(run_dir) for _, run_dir in runs}
    archived_rows, curves = [], []
    for path in args.archive:
        rows, arch_curves = read_archive(path, dataset, live)
        archived_rows += rows
        curves += arch_curves
    rows = report(runs, dataset, archived_rows)
    seeds = seed_summary(rows, dataset.keys)
    curves += curves_by_run(runs, "hr@10")
    results = ROOT / "benchmarks" / "results"
    figure = plot_curves(curves, "hr@10", results / f"{args.dataset}_quality.png", dataset)
    if figure:
        print(f"HR@10 curves against wall time and epoch: {figure}")
    out = results / f"{args.dataset}_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "seeds": seeds, "curves": curves}, indent=2))
    print(f"rows: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
