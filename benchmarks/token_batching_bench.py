"""Fixed-row batches against token budgets on ML-1M lengths: load imbalance across ranks, padding, speed.

    PYTHONPATH=. python benchmarks/token_batching_bench.py [--sequences ../shared/data/ml-1m/sequences.txt]
        [--world 2] [--rows-per-rank 64] [--steps 40]

Rows are the trainer's training rows under the reference protocol (every item but each user's
last, cut to max_seq_len + 1 = 201 stored items; the model sees up to 200). Per step and rank:

- attention cost = sum of l^2 of the rank's model inputs; imbalance = max over ranks / mean (every
  rank waits for the slowest at each collective, so 1.30 means ~30% of the attention time idle);
- padding: SASRec pads a batch to its longest row (tokens B x N, pairs B x N^2), HSTU pads each
  length group (``plan_length_groups``); waste = padded / real - 1.

``rows``: a global batch of ``world x rows-per-rank`` rows of the shuffled epoch, rank r taking
its r-th slice (the reader's ``partition=rows`` gives each rank a contiguous part of the shuffled
stream; the statistics are the same). ``tokens``: ``train/token_batching.py`` with the same mean
tokens per rank and step (and, in ``tokens+cost``, an attention-cost budget of 1.25x the rows
mode's mean cost).

Speed, two measurements in the same run:

- encoder: each mode runs the real HSTU encoder (the ML-1M config's shape) forward and backward on
  each rank's batches on ``world`` gloo processes, with an all-reduce per step as the trainer's
  collectives impose, for ``--steps`` steps, and reports tokens/s;
- trainer (``--train-data DIR``, a prepared ML-1M, ``--train-steps`` > 0): the real trainer
  (``torchrun -m train``, configs/hstu_ml1m.yaml, TorchRec + DeepSpeed on ``world`` processes) for
  ``--train-steps`` optimizer steps with ``data.batching=rows`` (``data.batch_size`` rows per step)
  and ``data.batching=tokens`` with the same tokens per step: a per-rank budget of
  ``batch_size x mean input length / world`` (the planner's rule, ``cluster/plan.py``; the mean from
  the data's manifest), ``--train-repeats`` runs each in the order rows, tokens, tokens, rows, ...
  Tokens/s and peak memory are the trainer's own (metrics.jsonl): the median over the runs' logged
  windows but each run's first, which holds the warm-up.

The encoder's modes take turns step by step, and the trainer runs alternate, so that the load of a
shared machine changing during the run does not favour one mode.

    PYTHONPATH=. python benchmarks/token_batching_bench.py --steps 20 \
        --train-data data/prepared/ml1m --train-steps 30 --train-repeats 2

Writes benchmarks/results/token_batching_bench.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train import token_batching as tb  # noqa: E402

MAX_SEQ_LEN = 200


def load_lengths(path: Path) -> np.ndarray:
    """Stored training-row lengths: every item but the last, cut to MAX_SEQ_LEN + 1."""
    lengths = []
    for line in path.read_text().splitlines():
        n = len(line.split()) - 1  # the user id first
        if n >= 3:
            lengths.append(min(n - 1, MAX_SEQ_LEN + 1))
    return np.array(lengths, dtype=np.int64)


def row_batches(lengths: np.ndarray, world: int, rows: int, seed: int) -> list[list[np.ndarray]]:
    perm = np.random.default_rng(seed).permutation(len(lengths))
    steps = len(perm) // (world * rows)
    return [
        [perm[(s * world + r) * rows : (s * world + r + 1) * rows] for r in range(world)]
        for s in range(steps)
    ]


def token_batches(lengths: np.ndarray, world: int, max_tokens: int, max_cost: int | None, seed: int):
    plan = tb.plan_epoch([lengths], world, max_tokens, max_cost, seed=seed, epoch=0)
    return [[np.array(p, dtype=np.int64) for p in b.parts] for b in plan[0]]


def stats(lengths: np.ndarray, steps: list[list[np.ndarray]]) -> dict:
    from train.models.hstu import HSTU, plan_length_groups

    inputs = lengths - 1  # model inputs: the stored row without its last item
    imbalance, token_imbalance, sas_tok, sas_pairs, hstu_pairs = [], [], [], [], []
    real_tok = real_pairs = 0
    for parts in steps:
        costs = [int((inputs[p] ** 2).sum()) for p in parts]
        toks = [int(inputs[p].sum()) for p in parts]
        imbalance.append(max(costs) / np.mean(costs))
        token_imbalance.append(max(toks) / np.mean(toks))
        for p in parts:
            ls = inputs[p]
            n = int(ls.max())
            sas_tok.append(len(ls) * n)
            sas_pairs.append(len(ls) * n * n)
            ordered = sorted(ls.tolist(), reverse=True)
            groups = plan_length_groups(ordered, HSTU.length_group_shrink, HSTU.length_group_min_size)
            hstu_pairs.append(sum((e - s) * ordered[s] ** 2 for s, e in groups))
            real_tok += int(ls.sum())
            real_pairs += int((ls**2).sum())
    return {
        "steps": len(steps),
        "rows_per_rank_mean": float(np.mean([len(p) for parts in steps for p in parts])),
        "tokens_per_rank_mean": float(np.mean([inputs[p].sum() for parts in steps for p in parts])),
        "attention_imbalance_mean": float(np.mean(imbalance)),
        "attention_imbalance_p95": float(np.percentile(imbalance, 95)),
        "attention_imbalance_max": float(np.max(imbalance)),
        "token_imbalance_mean": float(np.mean(token_imbalance)),
        "sasrec_token_padding": sum(sas_tok) / real_tok - 1,
        "sasrec_pair_padding": sum(sas_pairs) / real_pairs - 1,
        "hstu_pair_padding": sum(hstu_pairs) / real_pairs - 1,
    }


def _speed_worker(
    rank: int, world: int, init_file: str, lengths: list[int], modes: dict, steps: int, out: str
):
    import torch
    import torch.distributed as dist

    from train.models import build_encoder
    from train.models.config import ModelConfig

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    encoder = build_encoder(ModelConfig(name="hstu", embedding_dim=50, num_blocks=2, num_heads=1,
                                        attention_dim=50, linear_dim=50, dropout=0.2, max_seq_len=MAX_SEQ_LEN))  # fmt: skip
    inputs = np.array(lengths) - 1
    # The modes take turns step by step (after two warm-up steps each), so a change in the machine's
    # load during the run hits them alike; each step's time runs from a barrier to the step's all-reduce.
    seconds = dict.fromkeys(modes, 0.0)
    tokens = dict.fromkeys(modes, 0)
    for i in range(steps + 2):
        for name, batches in modes.items():
            parts = batches[i % len(batches)]
            ls = inputs[np.array(parts[rank])].tolist()
            offsets = torch.tensor([0, *np.cumsum(ls).tolist()])
            x = torch.randn(sum(ls), 50, requires_grad=True)
            dist.barrier()
            t0 = time.perf_counter()
            encoder(x, offsets, max(ls)).sum().backward()
            dist.all_reduce(torch.zeros(1))  # the step's collective: everyone waits for the slowest
            if i >= 2:
                seconds[name] += time.perf_counter() - t0
                tokens[name] += sum(ls)
    result = {}
    for name in modes:
        total = torch.tensor([float(tokens[name])])
        dist.all_reduce(total)
        result[name] = {"seconds": seconds[name], "tokens": int(total.item())}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def speed(lengths: np.ndarray, modes: dict, world: int, steps: int) -> dict:
    import torch.multiprocessing as mp

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    plain = {k: [[p.tolist() for p in parts] for parts in v] for k, v in modes.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "speed.json")
        mp.spawn(_speed_worker, args=(world, os.path.join(tmp, "rdzv"), lengths.tolist(), plain, steps, out),
                 nprocs=world, join=True)  # fmt: skip
        res = json.loads(Path(out).read_text())
    return {k: {**v, "tokens_per_s": v["tokens"] / v["seconds"]} for k, v in res.items()}


def trainer_speed(data_dir: Path, world: int, steps: int, log_every: int, repeats: int) -> dict:
    """The real trainer, rows then tokens, same tokens per optimizer step (see the module docstring)."""
    from cluster.plan import data_stats
    from train.config import load_train_config

    config = "configs/hstu_ml1m.yaml"
    cfg = load_train_config(str(ROOT / config), [f"data.dir={data_dir}"])
    _, mean_row, _ = data_stats(cfg)
    if mean_row is None:
        raise ValueError(
            f"{data_dir}/manifest.json: no split statistics; prepare the data with python -m data_pipeline"
        )
    mean_input = min(mean_row, cfg.model.max_seq_len + 1) - 1
    budget = max(math.ceil(cfg.data.batch_size * mean_input / world), 2 * (cfg.model.max_seq_len + 1))
    modes = {"rows": [], "tokens": ["data.batching=tokens", f"data.max_tokens_per_rank={budget}"]}
    # rows, tokens, then tokens, rows, ...: a drift in the machine's load does not favour one mode.
    order = [m for r in range(repeats) for m in (("rows", "tokens") if r % 2 == 0 else ("tokens", "rows"))]
    out = {"config": config, "data_dir": str(data_dir), "steps": steps, "world": world,
           "batch_size": cfg.data.batch_size, "mean_input_length": mean_input, "max_tokens_per_rank": budget}  # fmt: skip
    runs: dict[str, list[dict]] = {name: [] for name in modes}
    with tempfile.TemporaryDirectory() as tmp:
        for index, name in enumerate(order):
            overrides = modes[name]
            run_dir = Path(tmp) / f"{index}-{name}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   "-m", "train", "--config", config, f"data.dir={data_dir}", f"run.output_dir={run_dir}",
                   f"run.max_steps={steps}", f"run.log_every_steps={log_every}", "tracking.enabled=false",
                   "run.progress_bar=off", *overrides]  # fmt: skip
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  capture_output=True, text=True)  # fmt: skip
            if proc.returncode != 0:
                raise RuntimeError(f"trainer ({name}) failed:\n" + proc.stderr[-3000:])
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            windows = [r for r in records if "train/tokens_per_s" in r]
            steady = windows[1:] or windows
            runs[name].append(
                {
                    "tokens_per_s": statistics.median(r["train/tokens_per_s"] for r in steady),
                    "windows_tokens_per_s": [round(r["train/tokens_per_s"]) for r in windows],
                    "peak_memory_mib": max(r["train/peak_memory_mib"] for r in windows),
                    "wall_s": round(time.perf_counter() - t0, 1),
                }
            )
    for name, overrides in modes.items():
        out[name] = {
            "tokens_per_s": statistics.median(
                w for run in runs[name] for w in run["windows_tokens_per_s"][1:]
            ),
            "peak_memory_mib": max(run["peak_memory_mib"] for run in runs[name]),
            "runs": runs[name],
            "overrides": overrides,
        }
    out["order"] = order
    out["tokens_over_rows"] = out["tokens"]["tokens_per_s"] / out["rows"]["tokens_per_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--sequences", default=str(ROOT.parent / "shared" / "data" / "ml-1m" / "sequences.txt")
    )
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--rows-per-rank", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per mode (0: skip the speed run)")
    parser.add_argument("--train-data", default=None, help="a prepared ML-1M (data.dir) for the trainer runs")
    parser.add_argument(
        "--train-steps", type=int, default=30, help="optimizer steps per trainer run (0: skip)"
    )
    parser.add_argument("--train-log-every", type=int, default=5, help="steps per logged tokens/s window")
    parser.add_argument(
        "--train-repeats",
        type=int,
        default=2,
        help="trainer runs per mode, in the order rows, tokens, tokens, rows, ..",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "token_batching_bench.json"))
    args = parser.parse_args()
    lengths = load_lengths(Path(args.sequences))
    world = args.world
    rows_mode = row_batches(lengths, world, args.rows_per_rank, args.seed)
    mean_tokens = int(round(float(np.mean(lengths)) * args.rows_per_rank))
    max_tokens = max(mean_tokens, 2 * (MAX_SEQ_LEN + 1))
    mean_cost = float(np.mean([(lengths[p] ** 2).sum() for parts in rows_mode for p in parts]))
    modes = {
        "rows": rows_mode,
        "tokens": token_batches(lengths, world, max_tokens, None, args.seed),
        "tokens+cost": token_batches(lengths, world, max_tokens, int(1.25 * mean_cost), args.seed),
    }
    report = {"rows": len(lengths), "world": world, "max_tokens_per_rank": max_tokens,
              "max_attention_cost_per_rank (tokens+cost)": int(1.25 * mean_cost), "modes": {}}  # fmt: skip
    for name, steps in modes.items():
        report["modes"][name] = stats(lengths, steps)
    print(f"ML-1M: {len(lengths)} training rows, mean stored length {np.mean(lengths):.1f}; {world} ranks; "
          f"rows: {args.rows_per_rank} rows/rank; tokens: <= {max_tokens} items/rank")  # fmt: skip
    cols = ["steps", "rows_per_rank_mean", "tokens_per_rank_mean", "attention_imbalance_mean",
            "attention_imbalance_p95", "attention_imbalance_max", "token_imbalance_mean",
            "sasrec_token_padding", "sasrec_pair_padding", "hstu_pair_padding"]  # fmt: skip
    print(f"{'':<32}" + "".join(f"{m:>14}" for m in modes))
    for c in cols:
        print(f"{c:<32}" + "".join(f"{report['modes'][m][c]:>14.3f}" for m in modes))
    if args.steps:
        sp = speed(lengths, modes, world, args.steps)
        report["speed"] = sp
        print(
            f"{'HSTU fwd+bwd tokens/s (2 gloo)':<32}"
            + "".join(f"{sp[m]['tokens_per_s']:>14.0f}" for m in modes)
        )
    if args.steps:
        print(
            f"{'  encoder tokens/s vs rows':<32}"
            + "".join(f"{sp[m]['tokens_per_s'] / sp['rows']['tokens_per_s']:>13.2f}x" for m in modes)
        )
    if args.train_data and args.train_steps:
        tr = trainer_speed(
            Path(args.train_data).resolve(), world, args.train_steps, args.train_log_every, args.train_repeats
        )
        report["trainer"] = tr
        print(f"\nreal trainer ({tr['config']}, {world} processes, {tr['steps']} steps; tokens: "
              f"<= {tr['max_tokens_per_rank']} items/rank = {tr['batch_size']} rows x {tr['mean_input_length']:.1f} / {world})")  # fmt: skip
        print(f"{'':<32}{'rows':>14}{'tokens':>14}")
        print(f"{'trainer tokens/s (median window)':<32}{tr['rows']['tokens_per_s']:>14.0f}{tr['tokens']['tokens_per_s']:>14.0f}"
              f"   tokens / rows = {tr['tokens_over_rows']:.2f}x")  # fmt: skip
        print(
            f"{'peak memory MiB/rank':<32}{tr['rows']['peak_memory_mib']:>14.0f}{tr['tokens']['peak_memory_mib']:>14.0f}"
        )
        for index, m in enumerate(tr["order"]):
            run = tr[m]["runs"][tr["order"][:index].count(m)]
            print(
                f"  run {index + 1} ({m}): windows tokens/s {run['windows_tokens_per_s']} (the first is warm-up)"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
