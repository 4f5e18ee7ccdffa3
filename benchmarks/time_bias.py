"""Does HSTU's time bias help? The same model with and without it, paired by seed, on data with timestamps.

    python benchmarks/time_bias.py                                 # ML-100K, seeds 0 1 2
    python benchmarks/time_bias.py --seeds 0 1 2 3 4 --epochs 60
    python benchmarks/time_bias.py --report-only                   # table from finished runs

Why: ../shared's ML-1M has no timestamps, so our ML-1M HSTU runs with the position bias only, while
Meta's reference adds a bias over log-bucketed time gaps. ML-100K is MovieLens with timestamps (in
seconds), so the gap between the two arms here estimates what the missing timestamps cost on ML-1M.

Each run is ``torchrun -m train`` with configs/hstu_ml1m.yaml (the paper's HSTU) on
data/prepared/ml100k (prepared from ../shared/data/ml-100k when missing), the held-out valid split
for model selection (early stopping), and the test metrics of the best checkpoint. The two arms
differ only in ``model.use_time_bias``. Prints each seed's pair, the mean and median difference, and
writes benchmarks/results/time_bias.json.
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
ARMS = {"time+position": "true", "position only": "false"}


def run_dir(arm: str, seed: int) -> Path:
    return ROOT / "runs" / "time_bias" / f"{'time' if ARMS[arm] == 'true' else 'notime'}_seed{seed}"


def train(arm: str, seed: int, args: argparse.Namespace) -> None:
    out = run_dir(arm, seed)
    if (out / "final_metrics.json").is_file():
        print(f"[time_bias] {out.relative_to(ROOT)} is done; reusing it", flush=True)
        return
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", "--config", "configs/hstu_ml1m.yaml", f"data.dir={DATA}", "data.train_split=train",
           f"model.use_time_bias={ARMS[arm]}", f"run.seed={seed}", f"run.epochs={args.epochs}",
           f"eval.every_epochs={args.eval_every}", f"eval.patience={args.patience}", "run.output_dir=" + str(out),
           "tracking.experiment=time_bias"]  # fmt: skip
    print(f"[time_bias] {arm}, seed {seed}: {' '.join(cmd[2:])}", flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def report(seeds: list[int]) -> dict:
    pairs = []
    for seed in seeds:
        finals = {}
        for arm in ARMS:
            path = run_dir(arm, seed) / "final_metrics.json"
            if path.is_file():
                finals[arm] = json.loads(path.read_text())["test"]
        if len(finals) == len(ARMS):
            pairs.append({"seed": seed, **{arm: {k: finals[arm][k] for k in KEYS} for arm in ARMS}})
    if not pairs:
        print("[time_bias] no finished pair of runs under runs/time_bias")
        return {"pairs": []}
    with_time, without = ARMS
    print(f"\nHSTU on ML-100K, test of the best-valid checkpoint, {len(pairs)} seed(s)")
    print(f"{'seed':>4}  " + "  ".join(f"{k + ' ' + a[:4]:>14}" for k in KEYS for a in (with_time, without)))
    for p in pairs:
        print(
            f"{p['seed']:>4}  " + "  ".join(f"{p[a][k]:>14.4f}" for k in KEYS for a in (with_time, without))
        )
    summary = {}
    for k in KEYS:
        diffs = [p[with_time][k] - p[without][k] for p in pairs]
        summary[k] = {"mean_diff": statistics.mean(diffs), "median_diff": statistics.median(diffs),
                      "wins": sum(d > 0 for d in diffs), "pairs": len(diffs)}  # fmt: skip
        print(
            f"{k}: time bias minus position only: mean {summary[k]['mean_diff']:+.4f}, "
            f"median {summary[k]['median_diff']:+.4f}, better in {summary[k]['wins']}/{len(diffs)} seeds"
        )
    return {"pairs": pairs, "summary": summary}


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
            for arm in ARMS:
                train(arm, seed, args)
    result = report(args.seeds)
    out = ROOT / "benchmarks" / "results" / "time_bias.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
