"""How each cost grows with the catalogue and the log: prepare, a training step, evaluation (old and new).

    python benchmarks/scale_bench.py --quick          # 10^4 and 10^5 items: a few minutes
    python benchmarks/scale_bench.py                  # 10^4 .. 10^7 items (10^5 .. 10^8 events): hours

For each size N (items in the catalogue; N users with 10 events each on average, Zipf items from
``python -m data_pipeline generate``):

1. *prepare*: the Ray ``prepare`` job on the generated CSV in its own process tree
   (``benchmarks/prepare_bench.py``'s child), wall time and peak PSS of the whole tree.
2. *train step*: ``torchrun`` with 2 CPU processes (gloo), the real ``Trainer``: HSTU (D = 64),
   the N x 64 item table sharded row-wise with the fused optimizer (rowwise_adagrad), sampled
   negatives (``loss.negatives=shared``, 512 per step). Mean seconds per step over ``--steps`` steps
   after 3 warm-up steps; the epoch time is that times the steps of an epoch.
3. *eval*: ``Trainer.evaluate`` on the first ``--eval-users`` users of the valid split (every item
   ranked), ``eval.scoring=sharded`` (each rank scores its own rows of the table) then ``gathered``
   (the old path: the whole table on every rank). Wall time, and per rank the peak RSS sampled during
   the evaluation (absolute, and above the RSS just before it).
4. *end-of-run steps*: the sharded evaluation again, writing predictions (rank 0 merges every
   rank's top-k lists into Parquet with raw ids), and the popularity baseline on rank 0 (item counts
   over the whole train split); wall time and peak RSS of each.

Then the fitted growth exponent k of each time (least squares of log time on log size; prepare
against events, the rest against items): k ~ 0 is flat, k ~ 1 linear. Prints two tables and writes
``benchmarks/results/scale_bench.json``. Generated logs are cached under ``<work-dir>``; prepared data is
kept with ``--keep-data`` and reused (prepare skipped, its earlier figures reported) with
``--reuse-prepared``.
The machine is shared: the 1-minute load average at the end of each size is in the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

FULL_SIZES = [10_000, 100_000, 1_000_000, 10_000_000]
QUICK_SIZES = [10_000, 100_000]
EVENTS_PER_USER = 10
MAX_SEQ_LEN = 50
DIM = 64


# --- data: generate, prepare, a fixed set of eval users --------------------------------------------


def ensure_log(num_items: int, logs_dir: Path) -> Path:
    """A synthetic log of ~10 N events over N items and N users (generated once, cached)."""
    from cluster.config import to_dict
    from data_pipeline.synthetic import GenerateConfig, generate

    cfg = GenerateConfig(
        output_dir=str(logs_dir / f"items-{num_items}"), num_users=num_items, num_items=num_items,
        mean_seq_len=float(EVENTS_PER_USER), min_seq_len=5, num_topics=max(50, num_items // 1000),
        with_item_text=False, chunk_users=min(num_items, 100_000),
    )  # fmt: skip
    out = Path(cfg.output_dir)
    saved, csv = out / "generate_config.yaml", out / "interactions.csv"
    if csv.is_file() and saved.is_file():
        import yaml

        if yaml.safe_load(saved.read_text()) == to_dict(cfg):
            return csv
    print(f"generating {csv} ...", flush=True)
    return generate(cfg)


def eval_subset(prepared: Path, num_users: int, out: Path) -> Path:
    """A data dir identical to ``prepared`` (symlinks) whose valid split is its first ``num_users`` rows."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for child in prepared.iterdir():
        if child.name != "manifest.json":
            (out / child.name).symlink_to(child.resolve())
    manifest = json.loads((prepared / "manifest.json").read_text())
    first = prepared / manifest["splits"]["valid"]["files"][0]["path"]
    batches, rows = [], 0
    for batch in pq.ParquetFile(first).iter_batches(batch_size=1024):
        batches.append(batch)
        rows += batch.num_rows
        if rows >= num_users:
            break
    table = pa.Table.from_batches(batches).slice(0, num_users)
    (out / "valid_bench").mkdir()
    pq.write_table(table, out / "valid_bench" / "part-00000.parquet")
    num_interactions = int(pc.sum(pc.list_value_length(table.column("item_ids"))).as_py())
    entry = {"path": "valid_bench/part-00000.parquet", "num_rows": table.num_rows,
             "num_interactions": num_interactions}  # fmt: skip
    manifest["splits"]["valid"] = {
        "files": [entry],
        "num_rows": table.num_rows,
        "num_interactions": num_interactions,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out


# --- the trainer child (torchrun, one per rank) ----------------------------------------------------


class _PeakRSS:
    """Samples this process's RSS every few ms between start() and stop(); the peak in MiB."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._proc = psutil.Process()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> _PeakRSS:
        self.before = self._proc.memory_info().rss
        self.peak = self.before
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _train_child(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from train.config import load_train_config
    from train.distributed import all_reduce_sum, destroy_distributed, init_distributed
    from train.evaluation import evaluate_popularity
    from train.trainer import Trainer

    overrides = [
        f"data.dir={args.data}", f"run.output_dir={args.out}", "run.progress_bar=off", "tracking.enabled=false",
        "run.log_every_steps=1000000", "model.name=hstu", f"model.embedding_dim={DIM}", "model.num_blocks=2",
        "model.num_heads=1", "model.attention_dim=32", "model.linear_dim=32", f"model.max_seq_len={MAX_SEQ_LEN}",
        "model.dropout=0.0", "embeddings.sharding_type=row_wise", "embeddings.optimizer=rowwise_adagrad",
        "embeddings.compute_kernel=fused", "loss.negatives=shared", "loss.num_negatives=512",
        "data.batch_size=128", "data.eval_batch_size=256", "eval.exclude=input_window", "zero.stage=0",
        "eval.hr_at=[10]", "eval.ndcg_at=[10]",
    ]  # fmt: skip
    cfg = load_train_config(None, overrides)
    info = init_distributed()
    trainer = None
    result: dict = {"rank": info.rank}
    try:
        trainer = Trainer(cfg, info)
        trainer.engine.train()
        loader = iter(trainer.train_data.loader())
        times = []
        for i in range(3 + args.steps):
            batch = next(loader, None)
            n_local = trainer.task.count_targets(batch, trainer._step_context())
            has, n_global = all_reduce_sum([float(batch is not None), float(n_local)], trainer.device)
            if has < info.world_size:
                break
            dist.barrier()
            began = time.perf_counter()
            trainer.train_step(batch, int(n_global))
            dist.barrier()
            trainer.step += 1
            if i >= 3:
                times.append(time.perf_counter() - began)
        result["step_seconds"] = sum(times) / max(1, len(times))
        result["num_steps_timed"] = len(times)
        result["steps_per_epoch"] = trainer.steps_per_epoch
        for scoring in args.scorings:
            cfg.eval.scoring = scoring  # the task and the evaluator read this config object
            dist.barrier()
            with _PeakRSS() as mem:
                began = time.perf_counter()
                metrics = trainer.evaluate("valid")
                seconds = time.perf_counter() - began
            result[scoring] = {
                "seconds": seconds, "peak_rss_mib": mem.peak / 2**20, "above_start_mib": (mem.peak - mem.before) / 2**20,
                "num_users": metrics["num_users"], "hr@10": metrics["hr@10"],
            }  # fmt: skip
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
        # The trainer's end-of-run steps at this size: the same evaluation writing its predictions
        # (rank 0 merges the ranks' top-k lists and maps dense ids back to raw ones), and the
        # popularity baseline (rank 0; it counts items over the whole train split).
        cfg.eval.scoring = "sharded"
        dist.barrier()
        with _PeakRSS() as mem:
            began = time.perf_counter()
            trainer.evaluate("valid", predictions_path=Path(args.out) / "valid_predictions.parquet")
            seconds = time.perf_counter() - began
        result["predictions"] = {"seconds": seconds, "peak_rss_mib": mem.peak / 2**20,
                                 "above_start_mib": (mem.peak - mem.before) / 2**20}  # fmt: skip
        if info.is_main:
            with _PeakRSS() as mem:
                began = time.perf_counter()
                popularity = evaluate_popularity(cfg.data.dir, "valid")
                seconds = time.perf_counter() - began
            result["popularity"] = {"seconds": seconds, "peak_rss_mib": mem.peak / 2**20,
                                    "above_start_mib": (mem.peak - mem.before) / 2**20, "hr@10": popularity["hr@10"]}  # fmt: skip
        dist.barrier()
        trainer.close()
    finally:
        trainer = None
        destroy_distributed()
    Path(f"{args.result}.rank{info.rank}").write_text(json.dumps(result))
    return 0


# --- driver ---------------------------------------------------------------------------------------


def fit_exponent(sizes: list[float], values: list[float | None]) -> float | None:
    """k of value ~ size^k by least squares on logs (None with fewer than 2 points)."""
    pts = [(math.log(s), math.log(v)) for s, v in zip(sizes, values) if v is not None and v > 0]
    if len(pts) < 2:
        return None
    mx, my = sum(p[0] for p in pts) / len(pts), sum(p[1] for p in pts) / len(pts)
    den = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / den if den else None


def run_size(num_items: int, args: argparse.Namespace, work: Path) -> dict:
    from prepare_bench import _count_rows, run_measured

    csv = ensure_log(num_items, work / "logs")
    num_events = _count_rows(csv)
    prepared = work / "prepared" / f"items-{num_items}"
    measured = work / "runs" / f"prepare-{num_items}.measured.json"
    if args.reuse_prepared and (prepared / "manifest.json").is_file() and measured.is_file():
        print(
            f"[{num_items:,} items] prepared data and its prepare figures reused from {prepared}", flush=True
        )
        prep = json.loads(measured.read_text())
    else:
        shutil.rmtree(prepared, ignore_errors=True)
        result_path = work / "runs" / f"prepare-{num_items}.result.json"
        cmd = [
            sys.executable, str(ROOT / "benchmarks" / "prepare_bench.py"), "--child", "prepare", "--input", str(csv),
            "--out", str(prepared), "--result", str(result_path), "--max-seq-len", str(MAX_SEQ_LEN),
            "--num-cpus", str(args.num_cpus),
        ]  # fmt: skip
        print(f"[{num_items:,} items] prepare {num_events:,} events ...", flush=True)
        prep = run_measured(cmd, 0.25, work / "runs" / f"prepare-{num_items}.log")
        measured.write_text(json.dumps(prep))

    data = eval_subset(prepared, args.eval_users, work / "prepared" / f"items-{num_items}-eval")
    scorings = ["sharded"] + (["gathered"] if num_items <= args.gathered_max_items else [])
    out = work / "runs" / f"train-{num_items}"
    shutil.rmtree(out, ignore_errors=True)
    result = work / "runs" / f"train-{num_items}.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(Path(__file__)),
        "--child-train", "--data", str(data), "--out", str(out), "--result", str(result), "--steps",
        str(args.steps), "--scorings", *scorings,
    ]  # fmt: skip
    print(f"[{num_items:,} items] train steps + eval ({', '.join(scorings)}) on 2 processes ...", flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    began = time.perf_counter()
    with open(work / "runs" / f"train-{num_items}.log", "wb") as log:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = (work / "runs" / f"train-{num_items}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"the trainer child failed ({proc.returncode}):\n{tail}")
    ranks = [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(2)]
    record = {
        "num_items": num_items, "num_events": num_events, "prepare": prep,
        "step_seconds": ranks[0]["step_seconds"], "num_steps_timed": ranks[0]["num_steps_timed"],
        "steps_per_epoch": ranks[0]["steps_per_epoch"], "trainer_wall_seconds": time.perf_counter() - began,
        "load_average_1m": os.getloadavg()[0],
    }  # fmt: skip
    record["epoch_seconds"] = record["step_seconds"] * record["steps_per_epoch"]
    for scoring in scorings:
        record[scoring] = {
            "seconds": max(r[scoring]["seconds"] for r in ranks),
            "peak_rss_mib_per_rank": [r[scoring]["peak_rss_mib"] for r in ranks],
            "above_start_mib_per_rank": [r[scoring]["above_start_mib"] for r in ranks],
            "num_users": ranks[0][scoring]["num_users"],
            "hr@10": ranks[0][scoring]["hr@10"],
        }
    record["predictions"] = {
        "seconds": max(r["predictions"]["seconds"] for r in ranks),
        "peak_rss_mib_per_rank": [r["predictions"]["peak_rss_mib"] for r in ranks],
        "above_start_mib_per_rank": [r["predictions"]["above_start_mib"] for r in ranks],
    }
    record["popularity"] = ranks[0]["popularity"]
    if "gathered" in record and record["gathered"]["hr@10"] != record["sharded"]["hr@10"]:
        print(f"WARNING: sharded and gathered HR@10 differ at {num_items} items", flush=True)
    if not args.keep_data:
        shutil.rmtree(prepared, ignore_errors=True)
    return record


def print_table(records: list[dict], exponents: dict) -> None:
    def cell(v, fmt):
        return format("-", fmt.split(".")[0].rstrip(",")) if v is None else format(v, fmt)

    header = (
        f"{'items':>11} {'events':>12} {'prep s':>7} {'prep MiB':>9} {'step ms':>8} {'epoch s':>8} "
        f"{'eval new s':>10} {'new MiB/rank':>16} {'eval old s':>10} {'old MiB/rank':>16} {'users':>6} {'load':>5}"
    )

    def mem(x):  # the larger rank's peak RSS during the step, and (in brackets) its rise during it
        if x is None:
            return "-"
        return f"{max(x['peak_rss_mib_per_rank']):,.0f} (+{max(x['above_start_mib_per_rank']):,.0f})"

    print("\n" + header + "\n" + "-" * len(header))
    for r in records:
        new, old = r.get("sharded"), r.get("gathered")

        print(
            f"{r['num_items']:>11,} {r['num_events']:>12,} {r['prepare']['wall_seconds']:>7.1f} "
            f"{r['prepare']['peak_pss_mib']:>9,.0f} {1000 * r['step_seconds']:>8.1f} {r['epoch_seconds']:>8.1f} "
            f"{cell(new and new['seconds'], '>10.2f')} {mem(new):>16} "
            f"{cell(old and old['seconds'], '>10.2f')} {mem(old):>16} "
            f"{new['num_users'] if new else 0:>6} {r['load_average_1m']:>5.1f}"
        )
    e = exponents
    print(
        f"{'k (~size^k)':>11} {'':>12} {cell(e['prepare_seconds'], '>7.2f')} {cell(e['prepare_peak_mib'], '>9.2f')} "
        f"{cell(e['step_seconds'], '>8.2f')} {'':>8} {cell(e['eval_sharded_seconds'], '>10.2f')} "
        f"{cell(e['eval_sharded_peak_mib'], '>16.2f')} {cell(e['eval_gathered_seconds'], '>10.2f')} "
        f"{cell(e['eval_gathered_peak_mib'], '>16.2f')}"
    )
    print(
        "prepare k against events; the others against items. MiB/rank: the larger rank's peak RSS during "
        "eval (+ its rise above the RSS before eval); eval new = sharded, old = gathered."
    )
    # The end-of-run steps: the sharded eval again, now writing predictions; the popularity baseline.
    header = (
        f"{'items':>11} {'eval+predictions s':>18} {'MiB/rank':>16} {'popularity s':>12} {'MiB (rank 0)':>16}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    for r in records:
        pred, pop = r.get("predictions"), r.get("popularity")
        pop_mem = pop and {
            "peak_rss_mib_per_rank": [pop["peak_rss_mib"]],
            "above_start_mib_per_rank": [pop["above_start_mib"]],
        }
        print(
            f"{r['num_items']:>11,} {cell(pred and pred['seconds'], '>18.2f')} {mem(pred):>16} "
            f"{cell(pop and pop['seconds'], '>12.2f')} {mem(pop_mem):>16}"
        )
    print(
        f"{'k (~size^k)':>11} {cell(e['predictions_seconds'], '>18.2f')} {cell(e['predictions_peak_mib'], '>16.2f')} "
        f"{cell(e['popularity_seconds'], '>12.2f')} {cell(e['popularity_peak_mib'], '>16.2f')}"
    )
    print(
        "eval+predictions: the sharded eval of the same users, rank 0 then merging the ranks' top-k lists into "
        "test_predictions-style Parquet with raw ids; popularity: item counts over the whole train split, "
        "then the same users ranked."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"sizes {QUICK_SIZES} only")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help=f"items (default {FULL_SIZES})")
    parser.add_argument("--steps", type=int, default=20, help="timed train steps per size (after 3 warm-up)")
    parser.add_argument("--eval-users", type=int, default=1024, help="valid users evaluated per size")
    parser.add_argument("--gathered-max-items", type=int, default=10**9,
                        help="skip the old gathered eval above this many items (it holds the table twice per rank)")  # fmt: skip
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--keep-data", action="store_true", help="keep the prepared directories")
    parser.add_argument("--reuse-prepared", action="store_true",
                        help="a size whose prepared data was kept (--keep-data) skips prepare and reports its earlier figures")  # fmt: skip
    parser.add_argument("--child-train", action="store_true", help=argparse.SUPPRESS)
    for name in ("--data", "--out", "--result"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    parser.add_argument("--scorings", nargs="+", default=["sharded", "gathered"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_train:
        return _train_child(args)

    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    work = args.work_dir.resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    records = [run_size(n, args, work) for n in sizes]

    def col(path: list[str], reduce=None):
        out = []
        for r in records:
            v = r
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            out.append(reduce(v) if (reduce and v is not None) else v)
        return out

    items = [r["num_items"] for r in records]
    events = [r["num_events"] for r in records]
    exponents = {
        "prepare_seconds": fit_exponent(events, col(["prepare", "wall_seconds"])),
        "prepare_peak_mib": fit_exponent(events, col(["prepare", "peak_pss_mib"])),
        "step_seconds": fit_exponent(items, col(["step_seconds"])),
        "eval_sharded_seconds": fit_exponent(items, col(["sharded", "seconds"])),
        "eval_sharded_peak_mib": fit_exponent(items, col(["sharded", "peak_rss_mib_per_rank"], max)),
        "eval_gathered_seconds": fit_exponent(items, col(["gathered", "seconds"])),
        "eval_gathered_peak_mib": fit_exponent(items, col(["gathered", "peak_rss_mib_per_rank"], max)),
        "predictions_seconds": fit_exponent(items, col(["predictions", "seconds"])),
        "predictions_peak_mib": fit_exponent(items, col(["predictions", "peak_rss_mib_per_rank"], max)),
        "popularity_seconds": fit_exponent(items, col(["popularity", "seconds"])),
        "popularity_peak_mib": fit_exponent(items, col(["popularity", "peak_rss_mib"])),
    }
    print_table(records, exponents)
    command = " ".join(["python", "benchmarks/scale_bench.py", *(argv if argv is not None else sys.argv[1:])])
    report = {
        "command": command,
        "machine": {
            "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "results": records,
        "growth_exponents": exponents,
    }
    out_json = ROOT / "benchmarks" / "results" / "scale_bench.json"
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nreproduce: {command}\nwrote {out_json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
