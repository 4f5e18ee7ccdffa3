"""ML-1M quality: HSTU, HSTU-large, SASRec, GRU4Rec and BERT4Rec with their configs, beside published numbers.

    python benchmarks/ml1m_quality.py                       # sasrec, hstu, hstu_large, each config's epochs
    python benchmarks/ml1m_quality.py --models gru4rec bert4rec sasrec hstu   # the lineage on one protocol
    python benchmarks/ml1m_quality.py --models hstu --epochs 40 --nproc 2
    python benchmarks/ml1m_quality.py --report-only         # table from finished runs in runs/
    python benchmarks/ml1m_quality.py --report-only --run hstu=runs/hstu_full_tv   # any run directory

Prepares ../shared/data/ml-1m with configs/data/ml1m.yaml when data/prepared/ml1m is missing, runs
``torchrun -m train`` per model (output in runs/<model>_ml1m), then prints HR@10/50/200,
NDCG@10/50/200 and MRR of each test set beside the HSTU repository's published rows, the negatives
scheme and training split each run used, its epochs and wall time, and (for runs that keep a test
curve, ``data.train_split=train_valid``) the best point of the curve and when it first reached the
published HR@10. Writes benchmarks/results/ml1m_quality.json and a plot of the test HR@10 curves,
benchmarks/results/ml1m_quality.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

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


def run_model(name: str, nproc: int, overrides: list[str]) -> dict:
    out = ROOT / "runs" / f"{name}_ml1m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train",
           "--config", f"configs/{name}_ml1m.yaml", f"run.output_dir={out}", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"seconds": time.perf_counter() - t0}


def test_curve(run_dir: Path, key: str) -> list[tuple[int | None, float | None, float]]:
    """``[(epoch, elapsed seconds, value), ...]`` of ``test/<key>`` during training, from metrics.jsonl.

    Only ``data.train_split=train_valid`` runs evaluate test during training (as a curve, never for
    selection); other runs have no test curve and give [].
    """
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    curve, epoch = [], None
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        epoch = rec.get("train/epoch", epoch)
        if f"test/{key}" in rec:
            curve.append(
                (round(epoch) if epoch is not None else None, rec.get("elapsed_s"), rec[f"test/{key}"])
            )
    return curve


def time_to(
    curve: list[tuple[int | None, float | None, float]], target: float
) -> tuple[float | None, int | None]:
    """(elapsed seconds, epoch) of the first ``test_curve`` point at or above ``target``; (None, None) if none."""
    for epoch, seconds, value in curve:
        if value >= target and seconds is not None:
            return seconds, epoch
    return None, None


def plot_curves(runs: list[tuple[str, Path]], key: str, path: Path) -> Path | None:
    """Test ``key`` against epoch for every run that has a test curve, with each model's published value."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [(name, run_dir, test_curve(run_dir, key)) for name, run_dir in runs]
    curves = [(name, run_dir, curve) for name, run_dir, curve in curves if curve]
    if not curves:
        return None
    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, run_dir, curve in curves:
        ax.plot([e for e, _, _ in curve], [v for _, _, v in curve], marker="o", ms=3,
                label=f"{name}: {run_dir.name}")  # fmt: skip
    for name in dict.fromkeys(name for name, _, _ in curves):
        ax.axhline(PUBLISHED[name][key], ls="--", lw=1, color="gray")
        ax.text(0.01, PUBLISHED[name][key], f"published {name} {PUBLISHED[name][key]}", fontsize=8,
                va="bottom", transform=ax.get_yaxis_transform())  # fmt: skip
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test {key}")
    ax.set_title(f"ML-1M test {key} during training (train_valid runs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def run_input(config) -> str:
    """The raw file a run's data was prepared from (its manifest), e.g. ``ratings.dat`` or ``sequences.txt``."""
    manifest = Path(config.data.dir) / "manifest.json"
    if not manifest.is_file():
        return "?"
    paths = json.loads(manifest.read_text())["config"]["input"]["paths"]
    return ",".join(Path(p).name for p in paths)


def seed_summary(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over runs that differ only by seed (same model, input, time
    protocol, epochs, negatives): one line per group with two or more seeds."""
    import statistics

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
        for k in KEYS:
            values = [r[k] for r in group]
            line[k] = statistics.mean(values)
            line[f"{k}_std"] = statistics.stdev(values)
        out.append(line)
        print(
            f"{model:11s} {len(group)} seeds {line['seeds']} input={source} time_gap_from={gap} epochs={epochs}: "
            + " ".join(f"{k} {line[k]:.4f}+-{line[k + '_std']:.4f}" for k in ("hr@10", "ndcg@10", "mrr"))
        )
    return out


def report(runs: list[tuple[str, Path]]) -> list[dict]:
    """One row per finished run (model name, run dir) plus the published row of each model."""
    rows = []
    for name in dict.fromkeys(name for name, _ in runs):
        for model, run_dir in runs:
            path = run_dir / "final_metrics.json"
            if model != name:
                continue
            if not path.is_file():  # say why a run is missing from the table
                why = (
                    "not finished; its test curve, if any, is in the plot"
                    if run_dir.is_dir()
                    else "no such run"
                )
                print(f"{run_dir}: no final_metrics.json ({why})")
                continue
            final = json.loads(path.read_text())
            config = load_train_config(run_dir / "config.yaml")  # the run's resolved config
            curve = test_curve(run_dir, "hr@10")  # metrics.jsonl is read once per run
            seconds, epoch = time_to(curve, PUBLISHED[name]["hr@10"])
            reached = {
                target: time_to(curve, PUBLISHED[target]["hr@10"]) for target in ("hstu", "hstu_large")
            }
            best = max(curve, key=lambda point: point[2], default=(None, None, None))
            rows.append({"model": name, "source": str(run_dir.relative_to(ROOT)) if run_dir.is_relative_to(ROOT)
                         else str(run_dir), **{k: final["test"][k] for k in KEYS},
                         "epochs": final.get("epochs"), "negatives": config.loss.describe(),
                         "table_optimizer": config.embeddings.optimizer,
                         "train_split": final.get("train_split", "train"), "elapsed_s": final.get("elapsed_s"),
                         "published_hr@10_reached_s": seconds, "published_hr@10_reached_epoch": epoch,
                         "hstu_hr@10_reached_s": reached["hstu"][0], "hstu_large_hr@10_reached_s":
                         reached["hstu_large"][0], "seed": config.run.seed, "input": run_input(config),
                         "time_gap_from": getattr(config.model, "time_gap_from", None),
                         "best_curve_hr@10": best[2], "best_curve_epoch": best[0]})  # fmt: skip
        rows.append({"model": name, "source": "published", **PUBLISHED[name]})
    width = max(len(r["source"]) for r in rows)
    header = f"{'model':11s} {'source':{width}s} " + " ".join(f"{k:>8s}" for k in KEYS) + "  notes"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[k]:8.4f}" if k in r else f"{'':8s}" for k in KEYS)
        notes = ""
        if r["source"] != "published":
            notes = (
                f"epochs={r['epochs']} negatives={r['negatives']} table={r['table_optimizer']} "
                f"train_split={r['train_split']}"
            )
            if r["elapsed_s"]:
                notes += f" time={r['elapsed_s'] / 60:.0f}min"
            if r["best_curve_hr@10"] is not None:
                notes += (
                    f" best HR@10 on the curve {r['best_curve_hr@10']:.4f} (epoch {r['best_curve_epoch']})"
                )
            notes += f" input={r['input']} seed={r['seed']}"
            if r["time_gap_from"] is not None:
                notes += f" time_gap_from={r['time_gap_from']}"
            for target in ("hstu", "hstu_large"):
                if r[f"{target}_hr@10_reached_s"] is not None:
                    notes += f" {PUBLISHED[target]['hr@10']} at {r[f'{target}_hr@10_reached_s'] / 60:.0f}min"
            if r["published_hr@10_reached_s"] is not None:
                notes += (f" published HR@10 reached at epoch {r['published_hr@10_reached_epoch']}, "
                          f"{r['published_hr@10_reached_s'] / 60:.0f}min")  # fmt: skip
        print(f"{r['model']:11s} {r['source']:{width}s} {cells}  {notes}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["sasrec", "hstu", "hstu_large"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override run.epochs")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--run", action="append", default=[], metavar="MODEL=DIR",
                        help="also report this run directory as MODEL (a key of PUBLISHED)")  # fmt: skip
    parser.add_argument("overrides", nargs="*", help="extra trainer overrides, key.sub=value")
    args = parser.parse_args()
    os.chdir(ROOT)
    if not args.report_only:
        if not (ROOT / "data/prepared/ml1m/manifest.json").is_file():
            subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", "configs/data/ml1m.yaml"],
                           check=True)  # fmt: skip
        extra = list(args.overrides) + ([f"run.epochs={args.epochs}"] if args.epochs else [])
        for name in args.models:
            run_model(name, args.nproc, extra)
    runs = [(name, ROOT / "runs" / f"{name}_ml1m") for name in args.models]
    for item in args.run:
        model, _, run_dir = item.partition("=")
        if model not in PUBLISHED or not run_dir:
            parser.error(f"--run {item}: expected MODEL=DIR with MODEL one of {', '.join(PUBLISHED)}")
        runs.append((model, Path(run_dir).resolve()))
    rows = report(runs)
    rows += seed_summary(rows)
    figure = plot_curves(runs, "hr@10", ROOT / "benchmarks" / "results" / "ml1m_quality.png")
    if figure:
        print(f"test HR@10 curves: {figure}")
    out = ROOT / "benchmarks" / "results" / "ml1m_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
