"""ML-1M quality: HSTU, HSTU-large and SASRec with the paper configs, beside the published numbers.

    python benchmarks/ml1m_quality.py                       # all three, each config's epochs
    python benchmarks/ml1m_quality.py --models hstu --epochs 40 --nproc 2
    python benchmarks/ml1m_quality.py --report-only         # table from finished runs in runs/

Prepares ../shared/data/ml-1m with configs/data/ml1m.yaml when data/prepared/ml1m is missing, runs
``torchrun -m train`` per model (output in runs/<model>_ml1m), then prints HR@10/50/200,
NDCG@10/50/200 and MRR of each test set beside the HSTU repository's published rows, the negatives
scheme each run used, its epochs and wall time. Writes benchmarks/results/ml1m_quality.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = {  # HSTU repository, ML-1M, leave-one-out, all items ranked, history excluded
    "sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603, "hr@50": 0.5474, "hr@200": 0.7528},
    "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720, "hr@50": 0.5754, "hr@200": 0.7716},
    "hstu_large": {"hr@10": 0.3294, "ndcg@10": 0.1893, "hr@50": 0.5935, "hr@200": 0.7839},
}
KEYS = ["hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"]


def run_model(name: str, nproc: int, overrides: list[str]) -> dict:
    out = ROOT / "runs" / f"{name}_ml1m"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train",
           "--config", f"configs/{name}_ml1m.yaml", f"run.output_dir={out}", *overrides]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return {"seconds": time.perf_counter() - t0}


def report(names: list[str]) -> list[dict]:
    rows = []
    for name in names:
        path = ROOT / "runs" / f"{name}_ml1m" / "final_metrics.json"
        if path.is_file():
            final = json.loads(path.read_text())
            rows.append({"model": name, "source": "ours", **{k: final["test"][k] for k in KEYS},
                         "epochs": final.get("epochs"), "negatives": final.get("loss")})  # fmt: skip
        rows.append({"model": name, "source": "published", **PUBLISHED[name]})
    header = f"{'model':11s} {'source':9s} " + " ".join(f"{k:>8s}" for k in KEYS) + "  notes"
    print(header)
    print("-" * len(header))
    for r in rows:
        cells = " ".join(f"{r[k]:8.4f}" if k in r else f"{'':8s}" for k in KEYS)
        notes = ""
        if r["source"] == "ours":
            neg = r["negatives"] or {}
            notes = f"epochs={r['epochs']} negatives={neg.get('negatives')}({neg.get('num_negatives')})"
        print(f"{r['model']:11s} {r['source']:9s} {cells}  {notes}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["sasrec", "hstu", "hstu_large"])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=None, help="override run.epochs")
    parser.add_argument("--report-only", action="store_true")
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
    rows = report(args.models)
    out = ROOT / "benchmarks" / "results" / "ml1m_quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
