"""Semantic-ID stage at scale: RQ-VAE training (fixed steps) and assignment on synthetic vectors.

    python benchmarks/semantic_ids_bench.py                      # 10^5, 10^6, 10^7 items, dim 384
    python benchmarks/semantic_ids_bench.py --quick              # 10^5, 10^6
    python benchmarks/semantic_ids_bench.py --sizes 1000000 --dim 384 --train-steps 200

For each size, synthetic embeddings (a mixture of unit-norm clusters, like sentence embeddings) are
written in the embed stage's format, streamed, then each measured step runs in its own process (so
its peak RSS is its own):

* ``train``:  ``train_rqvae`` for ``--train-steps`` steps (k-means init included), batch 1024.
* ``assign``: the whole assign stage (stream-encode every item, collision token, write the table).
* ``assign_in_memory`` (the reference): the same encoding after loading every vector at once with
  ``pyarrow.parquet.read_table``, the obvious way; skipped when the vectors would not fit in
  ``--reference-max-gb``.

Prints a table and writes ``benchmarks/results/semantic_ids_bench.json``. The claim to check: time
grows linearly with the items, and the peak memory of ours grows only by the codes and raw ids
(~100 bytes per item), not by the vectors (dim x 4 bytes per item).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _peak_rss_mib() -> float:
    """This process's peak resident memory. VmHWM, not ru_maxrss: Linux carries ru_maxrss over
    exec, so a child would report at least its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_data(work: Path, num_items: int, dim: int, seed: int = 0) -> None:
    """Synthetic embeddings (streamed in chunks) and the vocab file the assign stage reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_pipeline.semantic_ids.embed import write_embeddings

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((1000, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    chunk = 200_000

    def batches():
        for start in range(0, num_items, chunk):
            n = min(chunk, num_items - start)
            x = centres[rng.integers(len(centres), size=n)] + 0.05 * rng.standard_normal(
                (n, dim), dtype=np.float32
            )
            yield x

    write_embeddings(work / "out", batches(), model="synthetic", rows_per_file=1_000_000, row_group_size=8192)
    (work / "prepared" / "vocab").mkdir(parents=True, exist_ok=True)
    ids = np.arange(1, num_items + 1)
    pq.write_table(
        pa.table({"raw_id": pa.array(np.char.add("i", ids.astype(str))), "dense_id": ids}),
        work / "prepared" / "vocab" / "items.parquet",
    )


def _config(work: Path, steps: int):
    from cluster.config import load_config
    from data_pipeline.semantic_ids.config import SemanticIdConfig

    return load_config(
        SemanticIdConfig,
        None,
        [f"output_dir={work / 'out'}", f"data_dir={work / 'prepared'}", "tracking.enabled=false",
         f"rqvae.num_steps={steps}", "rqvae.log_every_steps=50", f"rqvae.checkpoint_every_steps={steps}",
         "overwrite=true", "rqvae.resume=never"],
    )  # fmt: skip


def run_step(step: str, work: Path, steps: int) -> dict:
    """One measured step in this process; returns seconds and peak RSS."""
    import torch

    torch.set_num_threads(1)
    cfg = _config(work, steps)
    t0 = time.perf_counter()
    extra: dict = {}
    if step == "train":
        from data_pipeline.semantic_ids.train_rqvae import train_rqvae

        m = train_rqvae(cfg)
        extra = {"recon": m["train/recon"], "usage_l0": m["train/usage_l0"]}
    elif step == "assign":
        from data_pipeline.semantic_ids.assign import assign_ids

        m = assign_ids(cfg)
        extra = {"collision_rate": m["assign/collision_rate"], "usage_l0": m["assign/usage_l0"],
                 "encode_s": m["assign/seconds_encode"]}  # fmt: skip
    elif step == "assign_in_memory":
        import pyarrow.parquet as pq

        from data_pipeline.semantic_ids.train_rqvae import _to_numpy, embedding_files, load_model

        model = load_model(work / "out" / "rqvae" / "model.pt")
        files, _ = embedding_files(work / "out")
        x = torch.from_numpy(np.concatenate([_to_numpy(pq.read_table(f)) for f in files]))
        with torch.no_grad():
            codes = torch.cat([model.codes(x[i : i + 65536]) for i in range(0, len(x), 65536)])
        extra = {"num_codes": int(codes.shape[0])}
    else:
        raise ValueError(step)
    return {"seconds": time.perf_counter() - t0, "peak_rss_mib": _peak_rss_mib(), **extra}


def _subprocess(step: str, work: Path, steps: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--_step", step, "--_work", str(work), "--train-steps", str(steps)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    parser.add_argument("--quick", action="store_true", help="only 10^5 and 10^6 items")
    parser.add_argument("--dim", type=int, default=384, help="vector dim (all-MiniLM-L6-v2: 384)")
    parser.add_argument("--train-steps", type=int, default=200)
    parser.add_argument("--reference-max-gb", type=float, default=6.0)
    parser.add_argument("--workdir", default=None, help="where the synthetic data goes (default: a temp dir)")
    parser.add_argument("--_step", help=argparse.SUPPRESS)
    parser.add_argument("--_work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._step:
        print(json.dumps(run_step(args._step, Path(args._work), args.train_steps)))
        return
    sizes = [100_000, 1_000_000] if args.quick else args.sizes
    rows = []
    for n in sizes:
        work = Path(tempfile.mkdtemp(prefix=f"sid_bench_{n}_", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            make_data(work, n, args.dim)
            row = {"num_items": n, "dim": args.dim, "make_data_s": time.perf_counter() - t0}
            for step in ("train", "assign", "assign_in_memory"):
                if step == "assign_in_memory" and n * args.dim * 4 * 2 / 2**30 > args.reference_max_gb:
                    row[step] = None  # would not fit: that is the point of streaming
                    continue
                row[step] = _subprocess(step, work, args.train_steps)
            rows.append(row)
            print(json.dumps(row), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"\nRQ-VAE (dim {args.dim} -> 512-256-128-32, 3 x 256 codes), 1 thread, train {args.train_steps} steps of 1024"
    )
    print(f"{'items':>11} | {'train s':>8} {'train MiB':>9} | {'assign s':>8} {'items/s':>9} {'assign MiB':>10} | "
          f"{'in-memory s':>11} {'in-memory MiB':>13} | collision rate")  # fmt: skip
    for r in rows:
        ref = r["assign_in_memory"]
        ref_s = (
            f"{ref['seconds']:11.1f} {ref['peak_rss_mib']:13.0f}"
            if ref
            else f"{'skipped':>11} {'(too big)':>13}"
        )
        print(
            f"{r['num_items']:>11,} | {r['train']['seconds']:8.1f} {r['train']['peak_rss_mib']:9.0f} | "
            f"{r['assign']['seconds']:8.1f} {r['num_items'] / r['assign']['seconds']:9,.0f} "
            f"{r['assign']['peak_rss_mib']:10.0f} | {ref_s} | {r['assign']['collision_rate']:.4f}"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "semantic_ids_bench.json").write_text(json.dumps(rows, indent=2))
    print(f"-> {RESULTS / 'semantic_ids_bench.json'}")


if __name__ == "__main__":
    main()
