"""Does HSTU's time bias help? The same model with and without it, paired by seed, on data with timestamps.

    python benchmarks/time_bias.py                                 # ML-100K, seeds 0 1 2, all arms
    python benchmarks/time_bias.py --seeds 0 1 2 3 4 --arms target none
    python benchmarks/time_bias.py --report-only                   # table from finished runs

Why: ../shared's ML-1M has no timestamps, so our ML-1M HSTU runs with the position bias only, while
Meta's reference adds a bias over log-bucketed time gaps. ML-100K is MovieLens with timestamps (in
seconds), so the gap between the arms here estimates what the missing timestamps cost on ML-1M.

Arms (``--arms``), each a ``model.*`` override of the same run:
  target  time bias with gaps from the time of the item each position predicts (the reference's, the default)
  input   time bias with gaps from each position's own item time (model.time_gap_from=input)
  none    position bias only (model.use_time_bias=false)

Each run is ``torchrun -m train`` with configs/hstu_ml1m.yaml (the paper's HSTU) on
data/prepared/ml100k (prepared from ../shared/data/ml-100k when missing), the held-out valid split
for model selection (early stopping), and the test metrics of the best checkpoint. Prints each
seed's numbers, each time arm's mean and median difference from ``none`` over the seeds where both
finished, and writes benchmarks/results/time_bias.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data" / "prepared" / "ml100k"
KEYS = ["hr@10", "ndcg@10", "hr@50", "mrr"]
ARMS = {
    "target": ["model.use_time_bias=true", "model.time_gap_from=target"],
    "input": ["model.use_time_bias=true", "model.time_gap_from=input"],
    "none": ["model.use_time_bias=false"],
}
BASELINE = "none"


def run_dir(arm: str, seed: int) -> Path:
    return ROOT / "runs" / "time_bias" / f"{arm}_seed{seed}"


def train(arm: str, seed: int, args: argparse.Namespace) -> None:
    out = run_dir(arm, seed)
    if (out / "final_metrics.json").is_file():
        print(f"[time_bias] {out.relative_to(ROOT)} is done; reusing it", flush=True)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", "--config", "configs/hstu_ml1m.yaml", f"data.dir={DATA}", "data.train_split=train",
           *ARMS[arm], f"run.seed={seed}", f"run.epochs={args.epochs}",
           f"eval.every_epochs={args.eval_every}", f"eval.patience={args.patience}", "run.output_dir=" + str(out),
           "tracking.experiment=time_bias"]  # fmt: skip
    print(f"[time_bias] arm {arm}, seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def load_test(arm: str, seed: int) -> dict | None:
    path = run_dir(arm, seed) / "final_metrics.json"
    return json.loads(path.read_text())["test"] if path.is_file() else None


def report(seeds: list[int]) -> dict:
    finals = {(arm, seed): load_test(arm, seed) for arm in ARMS for seed in seeds}
    finals = {key: value for key, value in finals.items() if value is not None}
    if not finals:
        print("[time_bias] no finished run under runs/time_bias")
        return {"runs": [], "summary": {}}
    print("\nHSTU on ML-100K, test of the best-valid checkpoint, arms as columns (- = not run)")
    for k in KEYS:
        print(f"{k:>8}  " + "  ".join(f"{arm:>8}" for arm in ARMS))
        for seed in seeds:
            cells = [
                f"{finals[(arm, seed)][k]:>8.4f}" if (arm, seed) in finals else f"{'-':>8}" for arm in ARMS
            ]
            print(f"{'seed ' + str(seed):>8}  " + "  ".join(cells))
    summary = {}
    for arm in ARMS:
        paired = [s for s in seeds if arm != BASELINE and (arm, s) in finals and (BASELINE, s) in finals]
        if not paired:
            continue
        summary[arm] = {}
        for k in KEYS:
            diffs = [finals[(arm, s)][k] - finals[(BASELINE, s)][k] for s in paired]
            summary[arm][k] = {"mean_diff": statistics.mean(diffs), "median_diff": statistics.median(diffs),
                               "wins": sum(d > 0 for d in diffs), "seeds": paired}  # fmt: skip
            print(
                f"{k}: {arm} minus {BASELINE}: mean {statistics.mean(diffs):+.4f}, median "
                f"{statistics.median(diffs):+.4f}, better in {summary[arm][k]['wins']}/{len(diffs)} seeds"
            )
    runs = [{"arm": arm, "seed": seed, **{k: m[k] for k in KEYS}} for (arm, seed), m in finals.items()]
    return {"runs": runs, "summary": summary}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument(
        "--patience", type=int, default=5, help="evaluations without improvement before stopping"
    )
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    if not args.report_only:
        if not (DATA / "manifest.json").is_file():
            source = ROOT.parent / "shared" / "data" / "ml-100k"
            if not source.is_dir():
                print(
                    f"[time_bias] {source} is missing: it holds MovieLens-100K (see the README)",
                    file=sys.stderr,
                )
                return 2
            subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", "configs/data/ml100k.yaml"],
                           cwd=ROOT, check=True)  # fmt: skip
        for seed in args.seeds:
            for arm in args.arms:
                train(arm, seed, args)
    result = report(args.seeds)
    out = ROOT / "benchmarks" / "results" / "time_bias.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
