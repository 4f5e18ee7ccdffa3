"""Training throughput and peak memory of the real trainer (2 processes, TorchRec + DeepSpeed), every family.

    python benchmarks/train_throughput.py                    # all cases, 60 steps each
    python benchmarks/train_throughput.py --steps 100 --cases hstu_paper hstu_shared
    python benchmarks/train_throughput.py --cases sasrec_shared gru4rec_shared bert4rec_shared --data-dir DIR
    python benchmarks/train_throughput.py --reference /tmp/gr_ref --cases hstu_paper   # + Meta's reference
    python benchmarks/train_throughput.py --steps 16 --log-every 4 --cases hstu_shared sasrec_shared \
        sasrec_binary gru4rec_shared bert4rec_shared tiger_synthetic       # every family, a short run

Each case runs ``torchrun -m train`` on data/prepared/ml1m (or ``--data-dir``; TIGER on its own
data, below) with configs/hstu_ml1m.yaml (or the SASRec, GRU4Rec, BERT4Rec or TIGER config) plus the
case's overrides, for ``--steps`` optimizer steps logged every ``--log-every``, and reads tokens/s and
peak memory from the run's metrics.jsonl (the median over logged windows after the first, which
includes warm-up; s/step over the same windows). Cases:

    hstu_paper     HSTU, 128 negatives per position (the reference's scheme, same model config)
    hstu_shared    HSTU, 2048 negatives shared by the batch
    hstu_full      HSTU, every item a negative (the exact softmax over 3,706 items; the config default)
    hstu_padded    HSTU padded reference path, 2048 shared
    sasrec_shared  SASRec at equal width, 2048 shared
    gru4rec_shared GRU4Rec (configs/gru4rec_ml1m.yaml: d=64, one GRU layer of 128), 2048 shared
    gru4rec_full   GRU4Rec, the exact softmax (the config default)
    bert4rec_shared BERT4Rec (configs/bert4rec_ml1m.yaml: d=64, 2 blocks), cloze loss, 2048 shared
    bert4rec_full  BERT4Rec, the exact softmax at the masked positions (the config default)
    sasrec_binary  SASRec with its paper's loss: binary cross-entropy, 1 negative per position
    tiger_synthetic TIGER (configs/tiger_beauty.yaml: 4+4 layers, d_model 128, 20 history items,
                   beam 20) on a synthetic log of Beauty's shape (2,000 users, 1,200 items, ~9
                   events each; generated and prepared once into runs/bench_data/tiger_synthetic/) with
                   the tests' trivial tokenizer: 3 random codes of 256 + a collision token per item

tokens/s counts the items read (every model but TIGER reads the same ML-1M rows); BERT4Rec's loss
has about ``mask_prob`` as many terms per token as the next-item models'. TIGER reads other data (no
ML-1M semantic IDs exist; ML-1M's 200-item rows would also make each step ~20x Beauty's): its tokens/s
is items of the synthetic rows per second, each item a window of up to 20 items x 4 codes for the
encoder, so compare it with the others for order of magnitude only.

With ``--reference DIR`` (a checkout of facebookresearch/generative-recommenders, never modified)
the same run also measures Meta's reference implementation at the paper's ML-1M config beside our
matching case (benchmarks/reference_hstu.py: patched temporary copy, tokens counted alike on both
sides), prints that side-by-side table, and the "x reference" column uses the measured figure.
Without it no reference is run and the table has no ratio. ``--data-dir`` points every run at a
prepared ML-1M other than data/prepared/ml1m. Writes benchmarks/results/train_throughput.json.
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

ROOT = Path(__file__).resolve().parents[1]
SHARED = ["loss.negatives=shared", "loss.num_negatives=2048"]
CASES = {
    "hstu_paper": ("configs/hstu_ml1m.yaml", ["loss.negatives=per_position", "loss.num_negatives=128"]),
    "hstu_shared": ("configs/hstu_ml1m.yaml", SHARED),
    "hstu_full": ("configs/hstu_ml1m.yaml", ["loss.negatives=full"]),  # the config default
    "hstu_padded": ("configs/hstu_ml1m.yaml", [*SHARED, "model.jagged=false"]),
    "sasrec_shared": ("configs/sasrec_ml1m.yaml", SHARED),
    "gru4rec_shared": ("configs/gru4rec_ml1m.yaml", SHARED),
    "gru4rec_full": ("configs/gru4rec_ml1m.yaml", ["loss.negatives=full"]),
    "bert4rec_shared": ("configs/bert4rec_ml1m.yaml", SHARED),
    "bert4rec_full": ("configs/bert4rec_ml1m.yaml", ["loss.negatives=full"]),
    "sasrec_binary": (
        "configs/sasrec_ml1m.yaml",
        ["loss.function=binary", "loss.negatives=per_position", "loss.num_negatives=1"],
    ),
    "tiger_synthetic": ("configs/tiger_beauty.yaml", []),  # + its own data: see tiger_synthetic_overrides
}


def tiger_synthetic_overrides() -> list[str]:
    """A Beauty-shaped synthetic log prepared by the real data job, with random semantic IDs (made once)."""
    base = (
        ROOT / "runs" / "bench_data" / "tiger_synthetic"
    )  # not under runs/bench/<case>: that is wiped per run
    prepared, sids = base / "prepared", base / "semantic_ids"
    if not (prepared / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT))
        from data_pipeline.synthetic import GenerateConfig, generate

        log = generate(GenerateConfig(output_dir=str(base / "raw"), num_users=2000, num_items=1200,
                                      mean_seq_len=9, num_topics=50, with_item_text=False, seed=0))  # fmt: skip
        subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", "configs/data/synthetic.yaml",
                        f"input.paths=[{log}]", "input.item_metadata=null", f"output.dir={prepared}",
                        "ray.num_cpus=2"], cwd=ROOT, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    if not (sids / "manifest.json").is_file():
        sys.path.insert(0, str(ROOT))
        import pyarrow.parquet as pq

        from data_pipeline.semantic_ids.table import random_semantic_ids, write_semantic_ids

        raw_ids = pq.read_table(prepared / "vocab" / "items.parquet").column("raw_id").to_pylist()
        write_semantic_ids(sids, random_semantic_ids(raw_ids, num_levels=3, codebook_size=256, seed=0))
    return [f"data.dir={prepared}", f"model.semantic_ids_dir={sids}"]


# Cases that bring their own data (``--data-dir`` does not apply): name -> a function giving the overrides.
OWN_DATA = {"tiger_synthetic": tiger_synthetic_overrides}


def run_case(name: str, steps: int, nproc: int, data_dir: str | None = None, log_every: int = 10) -> dict:
    config, overrides = CASES[name]
    data = data_dir or "data/prepared/ml1m"
    if name in OWN_DATA:
        own = OWN_DATA[name]()
        overrides, data_dir = [*overrides, *own], None
        data = next(o.split("=", 1)[1] for o in own if o.startswith("data.dir="))
    out = ROOT / "runs" / "bench" / name
    if out.exists():
        subprocess.run(["rm", "-rf", str(out)], check=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", "-m", "train",
           "--config", config, f"run.output_dir={out}", f"run.max_steps={steps}", f"run.log_every_steps={log_every}",
           "tracking.enabled=false", "run.progress_bar=off", *overrides,
           *([f"data.dir={data_dir}"] if data_dir else [])]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_all = [r for r in records if "train/tokens_per_s" in r]
    train = train_all[1:]
    if not train:
        raise SystemExit(f"{name}: --steps {steps} logs one window of --log-every {log_every} steps (warm-up, "
                         "dropped); give --steps at least twice --log-every")  # fmt: skip
    return {
        "case": name,
        "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in train),
        # Wall time per step over the measured windows: from the end of the first (warm-up) to the last.
        "s_per_step": (train[-1]["elapsed_s"] - train_all[0]["elapsed_s"])
        / (train[-1]["step"] - train_all[0]["step"]),
        "data": data,
        "peak_memory_mib": max(r["train/peak_memory_mib"] for r in train),
        "wall_s": time.perf_counter() - t0,
        "steps": steps,
        "nproc": nproc,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--log-every", type=int, default=10, help="steps per logged window (the first is dropped)"
    )
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--data-dir", default=None, help="prepared ML-1M for every run (data.dir)")
    parser.add_argument(
        "--reference",
        type=Path,
        default=None,
        metavar="DIR",
        help="a generative-recommenders checkout: also run Meta's reference (copied, not modified)",
    )
    parser.add_argument("--reference-pairs", nargs="*", default=["hstu"], help="hstu, hstu_large")
    parser.add_argument("--reference-steps", type=int, default=20, help="measured steps per side")
    parser.add_argument("--reference-warmup", type=int, default=5, help="steps dropped first, per side")
    parser.add_argument(
        "--reference-data", type=Path, default=None, help="ML-1M .dat files (../shared/data/ml-1m)"
    )
    parser.add_argument("--no-detect-anomaly", action="store_true", help="the reference's anomaly mode off")
    args = parser.parse_args()
    if args.data_dir is None and not (ROOT / "data/prepared/ml1m/manifest.json").is_file():
        subprocess.run([sys.executable, "-m", "data_pipeline", "prepare", "--config", "configs/data/ml1m.yaml"],
                       cwd=ROOT, check=True)  # fmt: skip
    side_by_side, reference = [], None
    if args.reference is not None:
        import reference_hstu  # benchmarks/ is this script's folder

        side_by_side = reference_hstu.side_by_side(
            args.reference, args.reference_pairs, args.reference_warmup, args.reference_steps, args.nproc,
            args.data_dir, args.reference_data or reference_hstu.DEFAULT_ML1M, not args.no_detect_anomaly,
        )  # fmt: skip
        print(reference_hstu.format_table(side_by_side))
        reference = next(
            (r for r in side_by_side if r["side"] == "meta reference" and r["pair"] == "hstu"), None
        )
    unknown = [name for name in args.cases if name not in CASES]
    if unknown:
        parser.error(f"--cases {' '.join(unknown)}: expected some of {', '.join(CASES)}")
    rows = [run_case(name, args.steps, args.nproc, args.data_dir, args.log_every) for name in args.cases]
    print(f"{'case':16s} {'tokens/s':>10s} {'x reference':>12s} {'peak MiB/rank':>14s} {'s/step':>7s}  data")
    if reference is None:
        print(
            f"{'meta reference':16s} {'not run':>10s} {'-':>12s} {'-':>14s}  (no --reference DIR given: no ratio)"
        )
    else:
        print(f"{'meta reference':16s} {reference['tokens_per_s']:10.0f} {1.0:12.2f} {'-':>14s}  "
              f"(measured above, paper config; peak tree RSS {reference['peak_rss_mib']:.0f} MiB)")  # fmt: skip
    for r in rows:
        ratio = f"{r['tokens_per_s'] / reference['tokens_per_s']:12.2f}" if reference else f"{'-':>12s}"
        print(f"{r['case']:16s} {r['tokens_per_s']:10.0f} {ratio} {r['peak_memory_mib']:14.0f} "
              f"{r['s_per_step']:7.2f}  {r['data']}")  # fmt: skip
    out = ROOT / "benchmarks" / "results" / "train_throughput.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"reference_side_by_side": side_by_side, "runs": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
