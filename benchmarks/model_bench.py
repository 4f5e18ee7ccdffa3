"""Forward+backward throughput and peak memory of the dense encoders and of the two negative schemes.

Compares, at the ML-1M shape of the HSTU paper (batch 128, max length 200, d=50, 2 blocks, 1 head):

- HSTU jagged path vs its padded reference path (same parameters),
- HSTU vs SASRec at equal width, and HSTU without timestamps (position bias only),
- a whole training step (embedding lookups + HSTU + loss + backward) with 128 sampled negatives per
  position vs 512 negatives shared by the batch, vs in-batch negatives.

Sequence lengths are drawn once from a long-tailed distribution (20 + lognormal, capped at the max
length; mean ~157, half of the rows at the cap, like ML-1M users after truncation to 200). Every case
runs in its own subprocess, one after another. Per step we record wall time (median and minimum over
``--reps`` steps after ``--warmup``) and the process's CPU time; with the default single thread the
CPU time is the compute time even when other processes share the machine, so the ratios use it.
``tokens/s`` = input tokens / median wall time. ``peak MB`` is the
peak of tensor memory allocated during one extra step, from the PyTorch profiler's memory events
(activations kept for backward, gradients, temporaries); ``RSS MB`` is the growth of the process's
peak resident set over the whole case (VmHWM - VmRSS before the first step), which also counts the
allocator's slack.

    .venv/bin/python benchmarks/model_bench.py                    # full table, ~3 minutes on 2 cores
    .venv/bin/python benchmarks/model_bench.py --reps 3 --batch-size 32   # quicker

Writes ``benchmarks/results/model_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from cluster.log import setup_logging  # noqa: E402
from train.models import build_encoder, in_batch_softmax_loss, sample_negatives, sampled_softmax_loss  # noqa: E402
from train.models.config import ModelConfig  # noqa: E402

logger = logging.getLogger(__name__)

# name -> (encoder, jagged path, timestamps, negatives scheme or None for encoder only)
CASES = {
    "hstu_jagged": ("hstu", True, True, None),
    "hstu_padded": ("hstu", False, True, None),
    "hstu_jagged_no_ts": ("hstu", True, False, None),
    "sasrec_jagged": ("sasrec", True, False, None),
    "sasrec_padded": ("sasrec", False, False, None),
    "step_neg128_per_position": ("hstu", True, True, "per_position"),
    "step_neg512_shared": ("hstu", True, True, "shared"),
    "step_in_batch": ("hstu", True, True, "in_batch"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--num-items", type=int, default=3706, help="ML-1M has 3706 items")
    parser.add_argument("--neg-per-position", type=int, default=128)
    parser.add_argument("--neg-shared", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads; 1 by default because on a shared machine multi-threaded ops stall "
        "at every barrier when another process holds a core, which makes timings meaningless",
    )
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "model_bench.json"
    )
    parser.add_argument("--case", choices=sorted(CASES), help="internal: run one case and print its JSON")
    return parser.parse_args(argv)


def sample_lengths(args: argparse.Namespace) -> np.ndarray:
    """Long-tailed lengths: 20 + lognormal(5.2, 1.0), capped at --max-len (mean ~157 for 200)."""
    rng = np.random.default_rng(args.seed)
    return np.minimum(args.max_len, 20 + np.floor(rng.lognormal(5.2, 1.0, args.batch_size))).astype(np.int64)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def peak_allocated_mb(fn) -> float:
    """Peak of tensor bytes allocated (minus freed) while ``fn()`` runs, from the profiler's memory events."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**20


def run_case(args: argparse.Namespace) -> dict:
    """Build the model and a batch, time ``reps`` fwd+bwd steps, return medians and peak memory."""
    model_name, jagged, with_timestamps, scheme = CASES[args.case]
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    shared = dict(embedding_dim=args.dim, num_blocks=args.blocks, num_heads=args.heads, max_seq_len=args.max_len,
                  jagged=jagged)  # fmt: skip
    if model_name == "hstu":
        cfg = ModelConfig(name="hstu", attention_dim=args.dim, linear_dim=args.dim, **shared)
    else:  # SASRec's feed-forward width is the model width, as HSTU's d_v here
        cfg = ModelConfig(name="sasrec", ffn_dim=args.dim, **shared)
    encoder = build_encoder(cfg).train()
    table = torch.nn.Embedding(args.num_items + 1, args.dim)
    lengths = torch.from_numpy(sample_lengths(args))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    num_tokens, max_len = int(offsets[-1]), int(lengths.max())
    gen = torch.Generator().manual_seed(args.seed)
    item_ids = torch.randint(1, args.num_items + 1, (num_tokens,), generator=gen)
    gaps = torch.exp(torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 16).to(torch.int64)
    timestamps = target_timestamps = None
    if with_timestamps:  # the target time of a position is the next item's (for the last, one more gap)
        timestamps = 1_000_000_000 + gaps.cumsum(0)
        target_timestamps = timestamps + gaps.roll(-1)
    # Autoregressive supervision: every position but the last of its sequence predicts the next item.
    is_last = torch.zeros(num_tokens, dtype=torch.bool)
    is_last[offsets[1:][lengths > 0] - 1] = True
    supervised = torch.nonzero(~is_last).squeeze(1)
    target_ids = item_ids[supervised + 1]
    readout = torch.randn(num_tokens, args.dim, generator=gen)

    def step() -> None:
        encoder.zero_grad(set_to_none=True)
        table.zero_grad(set_to_none=True)
        query = encoder(table(item_ids), offsets, max_len, timestamps, target_timestamps)
        if scheme is None:
            loss = (query * readout).sum()  # encoder only; a fixed random read-out
        elif scheme == "in_batch":
            loss_sum, count = in_batch_softmax_loss(
                query[supervised], table(target_ids), target_ids, args.temperature
            )
            loss = loss_sum / count
        else:
            shape = (
                (supervised.numel(), args.neg_per_position)
                if scheme == "per_position"
                else (args.neg_shared,)
            )
            neg_ids = sample_negatives(args.num_items, shape, gen)
            loss_sum, count = sampled_softmax_loss(
                query[supervised], table(target_ids), target_ids, table(neg_ids), neg_ids, args.temperature
            )
            loss = loss_sum / count
        loss.backward()

    rss_before_kb = _status_kb("VmRSS")
    for _ in range(args.warmup):
        step()
    times, cpu_times = [], []
    for _ in range(args.reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    median = statistics.median(times)
    rss_growth_mb = (_status_kb("VmHWM") - rss_before_kb) / 1024
    peak_mb = peak_allocated_mb(step)
    return {
        "case": args.case,
        "model": model_name,
        "jagged": jagged,
        "timestamps": with_timestamps,
        "negatives": scheme,
        "num_tokens": num_tokens,
        "num_supervised": int(supervised.numel()),
        "step_s_median": median,
        "step_s_all": times,
        "tokens_per_s": num_tokens / median,
        "step_s_min": min(times),
        "cpu_s_median": statistics.median(cpu_times),
        "cpu_s_all": cpu_times,
        "peak_mb": peak_mb,
        "rss_growth_mb": rss_growth_mb,
        "torch_threads": torch.get_num_threads(),
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args)))
        return
    setup_logging()
    lengths = sample_lengths(args)
    logger.info(
        "batch %d, lengths mean %.1f min %d max %d (%.0f%% at the cap), d=%d, %d blocks, %d torch threads",
        args.batch_size,
        lengths.mean(),
        lengths.min(),
        lengths.max(),
        100 * (lengths == args.max_len).mean(),
        args.dim,
        args.blocks,
        args.threads,
    )
    passthrough = [
        f"--{key.replace('_', '-')}={value}"
        for key, value in vars(args).items()
        if key not in ("out", "case")
    ]
    results = {}
    for name in CASES:
        logger.info("running %s", name)
        proc = subprocess.run(
            [sys.executable, __file__, *passthrough, "--case", name],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
        results[name] = json.loads(proc.stdout.strip().splitlines()[-1])

    def ratio(a: str, b: str) -> float:
        # CPU time: with one thread it is the compute time, unaffected by other processes on the machine.
        return results[a]["cpu_s_median"] / results[b]["cpu_s_median"]

    ratios = {
        "hstu_padded_over_jagged_cpu_time": ratio("hstu_padded", "hstu_jagged"),
        "hstu_padded_over_jagged_peak_memory": results["hstu_padded"]["peak_mb"]
        / results["hstu_jagged"]["peak_mb"],
        "hstu_jagged_over_sasrec_jagged_cpu_time": ratio("hstu_jagged", "sasrec_jagged"),
        "hstu_with_over_without_timestamps_cpu_time": ratio("hstu_jagged", "hstu_jagged_no_ts"),
        "sasrec_padded_over_jagged_cpu_time": ratio("sasrec_padded", "sasrec_jagged"),
        "step_neg128_per_position_over_neg512_shared_cpu_time": ratio(
            "step_neg128_per_position", "step_neg512_shared"
        ),
        "step_in_batch_over_neg512_shared_cpu_time": ratio("step_in_batch", "step_neg512_shared"),
    }
    print(
        f"\n{'case':<26}{'wall ms':>9}{'min ms':>8}{'CPU ms':>8}{'tokens/s':>10}{'peak MB':>9}{'RSS MB':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:<26}{1000 * r['step_s_median']:>9.0f}{1000 * r['step_s_min']:>8.0f}"
            f"{1000 * r['cpu_s_median']:>8.0f}{r['tokens_per_s']:>10.0f}{r['peak_mb']:>9.0f}{r['rss_growth_mb']:>8.0f}"
        )
    print()
    for key, value in ratios.items():
        print(f"{key:<52}{value:>6.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "case"}
    summary = {
        "config": config,
        "lengths": {"mean": float(lengths.mean()), "min": int(lengths.min()), "max": int(lengths.max())},
        "results": results,
        "ratios": ratios,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    logger.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
