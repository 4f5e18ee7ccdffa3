"""The memory model (cluster/memory.py) against measurement, term by term.

    PYTHONPATH=. python benchmarks/memory_bench.py            # all sections
    PYTHONPATH=. python benchmarks/memory_bench.py --only dense
    PYTHONPATH=. python benchmarks/memory_bench.py --only tables
    PYTHONPATH=. python benchmarks/memory_bench.py --only dense --configs hstu-ckpt "H100 hstu-24L-ckpt"

Sections:

``dense`` — the real encoder (HSTU / SASRec), the real loss and AdamW for one step (after a warm-up
    step, so the optimizer state exists) under PyTorch's MemTracker: parameters, optimizer state,
    activations (+ backward temporaries) and the looked-up rows, at the step's peak. ``real`` rows
    allocate on CPU (fp32); ``fake`` rows run under FakeTensorMode (bf16), which tracks tensors of
    H100 size without allocating them. On CUDA, max_memory_allocated is printed too.
    Predicted: dense_params, the harness's optimizer (torch AdamW: two moments in the parameters'
    dtype; DeepSpeed's fp32 state is the ``zero`` section's business), activations + attention +
    loss, and the harness's looked-up rows (one leaf [2T + negatives, D] fp32 and its gradient).
``tiger`` — TIGER's encoder-decoder (``train.models.tiger.Tiger``), its cross-entropy and AdamW for one
    step under MemTracker (``measure_tiger_step``), against ``TigerMemory`` (``train/tasks/tiger.py``,
    reached through ``TigerTask.memory_model``) with CPU kernels (``device_type="cpu"``).
``tables`` — real TorchRec sharded item tables (``train.embeddings.build_item_table``) on 2 gloo
    processes for each sharding type and table optimizer: bytes of the rank's local shards and of
    its fused optimizer state (and data_parallel's dense gradient after a backward), worst rank,
    against ``embedding_bytes``.
``zero`` — the real DeepSpeed engine (``train.zero``) on 2 gloo processes, ZeRO stages 0-3, fp32:
    the bytes of the parameters, and of every other tensor alive after a step (optimizer moments,
    fp32 partitions, DeepSpeed's persistent buffers), against ``dense_bytes`` (stage 3's reduction
    bucket included; stages 1-2 allocate theirs inside backward, so it is not alive here).

Target: total within 10% on every config, 15% on the smallest (marked ``small``), where fixed
overheads dominate. Writes benchmarks/results/memory_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cluster.memory import (  # noqa: E402
    ACTIVATION_MODELS,
    DEEPSPEED_REDUCE_BUCKET,
    BatchShape,
    ModelDims,
    dense_bytes,
    embedding_bytes,
    fmt_bytes,
    loss_bytes,
    pending_rows_grad_bytes,
)
from cluster.memory_measure import measure_dense_step  # noqa: E402

# (label, family, D, blocks, heads, d_qk = d_v, lengths, negatives, K, items, dropout, checkpointing, fake)
DENSE_GRID = [
    ("small", "hstu", 32, 1, 1, 32, [20] * 8, "shared", 32, 500, 0.0, False, False),
    ("hstu-short", "hstu", 64, 2, 2, 32, [50] * 64, "shared", 256, 2000, 0.0, False, False),
    ("hstu-long", "hstu", 64, 2, 2, 32, [400] * 12, "shared", 256, 2000, 0.0, False, False),
    ("hstu-mixed", "hstu", 128, 4, 4, 32, [300] * 4 + [60] * 40, "in_batch", 0, 2000, 0.2, False, False),
    ("hstu-full", "hstu", 64, 2, 1, 64, [100] * 30, "full", 0, 3706, 0.0, False, False),
    ("hstu-perpos", "hstu", 64, 2, 1, 64, [50] * 20, "per_position", 128, 3706, 0.0, False, False),
    ("hstu-ckpt", "hstu", 64, 4, 2, 32, [200] * 16, "shared", 256, 2000, 0.0, True, False),
    ("hstu-ckpt-wide", "hstu", 64, 4, 4, 64, [20] * 160, "shared", 256, 2000, 0.0, True, False),
    ("hstu-ckpt-drop", "hstu", 64, 2, 2, 32, [120] * 24, "in_batch", 0, 2000, 0.2, True, False),
    ("sasrec", "sasrec", 64, 2, 1, 64, [100] * 40, "shared", 256, 2000, 0.0, False, False),
    ("sasrec-ckpt", "sasrec", 64, 2, 1, 64, [100] * 40, "shared", 16, 2000, 0.0, True, False),
    ("sasrec-wide", "sasrec", 256, 2, 4, 64, [50] * 40, "shared", 256, 2000, 0.2, False, False),
    # FakeTensorMode, bf16: GPU-sized steps (tens of GiB) measured without allocating them.
    ("H100 hstu-24L", "hstu", 512, 24, 8, 64, [1024] * 16, "shared", 4096, 10**6, 0.0, False, True),
    ("H100 hstu-24L-ckpt", "hstu", 512, 24, 8, 64, [1024] * 16, "shared", 4096, 10**6, 0.0, True, True),
    (
        "H100 hstu-mixed",
        "hstu",
        256,
        8,
        4,
        64,
        [2048] * 8 + [256] * 128,
        "shared",
        8192,
        10**6,
        0.0,
        False,
        True,
    ),
    ("H100 sasrec-12L", "sasrec", 1024, 12, 16, 64, [1024] * 32, "shared", 4096, 10**6, 0.0, False, True),
]


def dense_rows(configs: list[str] | None = None) -> list[dict]:
    out = []
    for label, family, d, blocks, heads, dh, lengths, neg, k, items, drop, ckpt, fake in DENSE_GRID:
        if configs and label not in configs:
            continue
        dims = ModelDims(family, d, blocks, heads, dh, dh, max(lengths), dropout=drop, use_time_bias=False)
        dtype = torch.bfloat16 if fake else torch.float32
        b = 2 if fake else 4
        t0 = time.perf_counter()
        m = measure_dense_step(dims, lengths, negatives=neg, num_negatives=k, num_items=items, dtype=dtype,
                               checkpointing=ckpt, fake=fake)  # fmt: skip
        seconds = time.perf_counter() - t0
        batch = BatchShape.from_lengths(lengths, family)
        act = dict(ACTIVATION_MODELS[family](dims, batch, b, ckpt))
        p = dims.num_params()
        negs = {"shared": k, "per_position": batch.num_tokens * k, "full": items, "in_batch": 0}[neg]
        rows = (2 * batch.num_tokens + negs) * d * 4
        loss = loss_bytes(batch, d, neg, k, items)
        # Checkpointing: the recomputed layer with the target and negative rows' gradients, or the loss
        # buffers, whichever is larger (estimate_memory's "recompute" term). The harness's ``query``
        # (fp32 [T, D]) lives through its backward; the trainer's train_loss returns before it.
        loss_or_recompute = loss
        if ckpt:
            pending = pending_rows_grad_bytes(batch, d, neg, k, items)
            loss_or_recompute = max(loss, act.pop("recompute") + pending + 4 * batch.num_tokens * d)
        predicted = {
            "params": dense_bytes(p, 0, 1, "fp32")["dense_params"] * b // 4,
            "optimizer": 2 * b * p,  # torch AdamW's moments in the parameters' dtype
            # + the bf16 copy of the inputs (the encoder's input), which MemTracker counts as an activation
            "activations": act["activations"]
            + act["attention"]
            + loss_or_recompute
            + (batch.num_tokens * d * b if fake else 0),
            # the harness's lookup output: one fp32 leaf (its gradient comes in backward, see lookup_bytes)
            "lookup rows": rows,
        }
        measured = {
            "params": m.params,
            "optimizer": m.optimizer,
            "activations": m.activations,
            "lookup rows": m.other,
        }
        out.append(
            {
                "section": "dense",
                "config": label,
                "mode": "fake bf16" if fake else "real fp32",
                "tokens": batch.num_tokens,
                "sum_l2": batch.sum_squares,
                "predicted": predicted,
                "measured": measured,
                "predicted_total": sum(predicted.values()),
                "measured_total": m.total,
                "cuda_peak": m.cuda_peak,
                "seconds": round(seconds, 1),
                "target": 0.15 if label == "small" else 0.10,
            }
        )
        print(f"  measured {label} in {seconds:.1f}s", flush=True)
        gc.collect()
    return out


# ------------------------------------------------------------------------------------- tiger

# (label, TigerConfig overrides, codebook sizes, examples E, fake). Every example has the full history,
# so the encoder reads S = 1 + L max_history_items tokens. fp32 throughout: on CPU, PyTorch's math
# attention kernel and RMSNorm upcast bf16 to fp32 internally, which GPUs' kernels do not, so a bf16
# run here would measure CPU kernels rather than the CUDA path (fused attention) the planner models.
TIGER_GRID = [
    ("tiger-paper", dict(dropout=0.1), [256, 256, 256, 8], 128, False),  # the paper's sizes, 20 items
    ("tiger-nodrop", dict(dropout=0.0, max_history_items=10), [256, 256, 256, 8], 256, False),
    (
        "H100 tiger-wide",
        dict(d_model=512, num_heads=8, head_dim=64, d_ff=2048, num_encoder_layers=8, num_decoder_layers=8),
        [1024, 1024, 1024, 16],
        512,
        True,
    ),  # fmt: skip
]


def tiger_rows(configs: list[str] | None = None) -> list[dict]:
    """TIGER's encoder-decoder step (``measure_tiger_step``) against ``TigerMemory`` (train/tasks/tiger.py)."""
    from cluster.memory_measure import measure_tiger_step
    from train.models.tiger import TigerConfig
    from train.tasks.tiger import TigerMemory

    out = []
    for label, overrides, codebooks, examples, fake in TIGER_GRID:
        if configs and label not in configs:
            continue
        cfg = TigerConfig(**overrides)
        family = TigerMemory(cfg, codebooks)
        batch = family.batch_bound(examples)
        b = 4
        t0 = time.perf_counter()
        m = measure_tiger_step(cfg, codebooks, examples, batch.max_len, fake=fake)
        seconds = time.perf_counter() - t0
        # CPU kernels (the harness runs on CPU, FakeTensorMode included): device_type="cpu".
        terms = family.step_terms(batch, num_items=0, dtype_bytes=b, checkpointing=False, has_timestamps=False,
                                  device_type="cpu")  # fmt: skip
        tokens = examples * (batch.max_len + family.num_levels)
        p = family.num_params()
        predicted = {
            "params": b * p,
            "optimizer": 2 * b * p,
            "activations": terms["activations"] + terms["attention"] + terms["loss"],
            "lookup rows": 4 * tokens * cfg.d_model,  # the harness's one fp32 leaf
        }  # fmt: skip
        measured = {
            "params": m.params,
            "optimizer": m.optimizer,
            "activations": m.activations,
            "lookup rows": m.other,
        }
        out.append({"section": "tiger", "config": label, "mode": "fake fp32" if fake else "real fp32",
                    "tokens": batch.padded_tokens, "sum_l2": batch.padded_squares, "predicted": predicted,
                    "measured": measured, "predicted_total": sum(predicted.values()), "measured_total": m.total,
                    "seconds": round(seconds, 1), "target": 0.10})  # fmt: skip
        print(f"  measured {label} in {seconds:.1f}s", flush=True)
        gc.collect()
    return out


# ------------------------------------------------------------------------------------ tables

TABLE_GRID = [
    (sharding, opt)
    # table_row_wise is left out: TorchRec finds no CPU plan for it with an EmbeddingCollection.
    for sharding in ("row_wise", "table_wise", "column_wise")
    for opt in ("rowwise_adagrad", "adagrad", "sgd")
] + [("data_parallel", "adam"), ("data_parallel", "sgd")]
TABLE_ROWS, TABLE_DIM = 100_001, 250  # stored as 252 columns; column_wise: blocks of min_partition=84


def _tensor_bytes(obj) -> int:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    if isinstance(obj, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in obj.local_shards())
    if hasattr(obj, "to_local"):  # DTensor
        obj = obj.to_local()
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _table_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    from train.config import EmbeddingTableConfig
    from train.distributed import destroy_distributed
    from train.embeddings import build_item_table, lookup

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    results = {}
    try:
        for sharding, opt in TABLE_GRID:
            cfg = EmbeddingTableConfig(sharding_type=sharding, optimizer=opt, min_partition=84)
            table = build_item_table(cfg, TABLE_ROWS - 1, TABLE_DIM, torch.device("cpu"), seed=0)
            ids = torch.randint(1, TABLE_ROWS, (64,))
            lookup(table, ids, torch.device("cpu")).sum().backward()  # a step creates the state
            weights = _tensor_bytes(table.module.state_dict()[table.weight_key])
            state = table.optimizer.state_dict()["state"]
            opt_bytes = _tensor_bytes(state)
            grads = 0
            if table.data_parallel:
                grads = sum(_tensor_bytes(p.grad) for p in table.module.parameters() if p.grad is not None)
            table.step()
            if table.data_parallel:  # adam's moments exist after the first step
                opt_bytes = _tensor_bytes(table.optimizer.state_dict()["state"])
            results[f"{sharding}/{opt}"] = [weights, opt_bytes, grads]
            del table
            gc.collect()
    finally:
        destroy_distributed()
    Path(f"{out_file}.{rank}").write_text(json.dumps(results))


def table_rows() -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "tables")
        mp.spawn(_table_worker, args=(2, os.path.join(tmp, "rdzv"), out), nprocs=2, join=True)
        per_rank = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    rows = []
    for sharding, opt in TABLE_GRID:
        key = f"{sharding}/{opt}"
        worst = max((r[key] for r in per_rank), key=lambda v: v[0])
        pred = embedding_bytes(TABLE_ROWS, TABLE_DIM, sharding, opt, 2, 2, min_partition=84)
        predicted = {
            "embedding_weights": pred["embedding_weights"],
            "embedding_optimizer": pred["embedding_optimizer"],
            "embedding_grads": pred["embedding_grads"],
        }
        measured = dict(zip(predicted, worst))
        rows.append(
            {
                "section": "tables",
                "config": key,
                "mode": "TorchRec, 2 gloo ranks (worst)",
                "predicted": predicted,
                "measured": measured,
                "predicted_total": sum(predicted.values()),
                "measured_total": sum(measured.values()),
                "target": 0.10,
            }
        )
    return rows


# -------------------------------------------------------------------------------------- zero


def _zero_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(29600 + os.getppid() % 1000)})  # fmt: skip
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from train.config import load_train_config
    from train.distributed import destroy_distributed
    from train.models import build_encoder
    from train.zero import build_engine, deepspeed_config

    results = {}
    try:
        for stage in (0, 1, 2, 3):
            cfg = load_train_config(None, [
                "model.embedding_dim=256", "model.num_blocks=4", "model.num_heads=4", "model.attention_dim=64",
                "model.linear_dim=64", f"zero.stage={stage}", "zero.precision=fp32", "data.batch_size=4",
            ])  # fmt: skip
            torch.manual_seed(0)
            encoder = build_encoder(cfg.model)
            num_params = sum(p.numel() for p in encoder.parameters())
            engine = build_engine(encoder, cfg, deepspeed_config(cfg, world, torch.device("cpu")), 10)
            lengths = [30, 20]
            x = torch.randn(sum(lengths), 256)
            offsets = torch.tensor([0, 30, 50])
            loss = engine(x, offsets, 30).sum()
            engine.backward(loss)
            engine.step()
            gc.collect()
            params = {}
            for p in engine.module.parameters():
                t = getattr(p, "ds_tensor", None)
                t = t if t is not None else p.data
                params[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            seen = set(params)
            opt_bytes = 0
            for obj in gc.get_objects():
                if isinstance(obj, torch.Tensor) and not isinstance(obj, torch.nn.Parameter):
                    try:
                        st = obj.untyped_storage()
                    except Exception:
                        continue
                    if st.data_ptr() in seen or st.nbytes() == 0:
                        continue
                    seen.add(st.data_ptr())
                    opt_bytes += st.nbytes()
            results[str(stage)] = [num_params, sum(params.values()), opt_bytes]
            del engine, encoder
            gc.collect()
    finally:
        destroy_distributed()
    Path(f"{out_file}.{rank}").write_text(json.dumps(results))


def zero_rows() -> list[dict]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "zero")
        mp.spawn(_zero_worker, args=(2, os.path.join(tmp, "rdzv"), out), nprocs=2, join=True)
        per_rank = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    rows = []
    for stage in (0, 1, 2, 3):
        num_params, params, other = max((r[str(stage)] for r in per_rank), key=lambda v: v[1] + v[2])
        pred = dense_bytes(num_params, stage, 2, "fp32", largest_layer_params=0,
                           reduce_bucket_elements=DEEPSPEED_REDUCE_BUCKET)  # fmt: skip
        # Alive after the step: stage 2's gradient partition and buckets, stage 3's bucket and flat
        # gradient partition (stage 1 frees its bucket and gradients at the step).
        alive = {2: pred["dense_grads"] + pred["dense_buffers"], 3: pred["dense_buffers"]}
        buffers = alive.get(stage, 0)
        predicted = {
            "dense_params": pred["dense_params"],
            "optimizer+grads+buffers": pred["dense_optimizer"] + buffers,
        }
        measured = {"dense_params": params, "optimizer+grads+buffers": other}
        rows.append(
            {
                "section": "zero",
                "config": f"stage {stage}, {num_params} params",
                "mode": "DeepSpeed, 2 gloo ranks, after a step",
                "predicted": predicted,
                "measured": measured,
                "predicted_total": sum(predicted.values()),
                "measured_total": sum(measured.values()),
                "target": 0.10,
            }
        )
    return rows


# -------------------------------------------------------------------------------------- report


def print_table(rows: list[dict]) -> None:
    for row in rows:
        err = (row["predicted_total"] - row["measured_total"]) / max(1, row["measured_total"])
        row["total_error"] = err
        row["within_target"] = abs(err) <= row["target"]
        flag = "ok" if row["within_target"] else "MISS"
        shape = ""
        if "tokens" in row:
            shape = (f", encoder tokens={row['tokens']}, E S^2={row['sum_l2']}" if row["section"] == "tiger"
                     else f", T={row['tokens']}, sum l^2={row['sum_l2']}")  # fmt: skip
        print(f"\n[{row['section']}] {row['config']} ({row['mode']}){shape}")
        print(f"  {'term':<22}{'predicted':>14}{'measured':>14}{'error':>9}")
        for term in row["predicted"]:
            p, m = row["predicted"][term], row["measured"][term]
            e = f"{(p - m) / m:+.1%}" if m else ("0" if p == 0 else "n/a")
            print(f"  {term:<22}{fmt_bytes(p):>14}{fmt_bytes(m):>14}{e:>9}")
        print(f"  {'TOTAL (peak)':<22}{fmt_bytes(row['predicted_total']):>14}{fmt_bytes(row['measured_total']):>14}"
              f"{err:>+9.1%}  target {row['target']:.0%}: {flag}")  # fmt: skip
        if row.get("cuda_peak"):
            print(f"  cuda max_memory_allocated {fmt_bytes(row['cuda_peak'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=["dense", "tiger", "tables", "zero"], default=None)
    parser.add_argument(
        "--configs",
        nargs="*",
        default=None,
        help="dense / tiger configs to run (labels of DENSE_GRID, TIGER_GRID; default all)",
    )
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory_bench.json"))
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows: list[dict] = []
    if args.only in (None, "dense"):
        rows += dense_rows(args.configs)
    if args.only in (None, "tiger"):
        rows += tiger_rows(args.configs)
    if args.only in (None, "tables"):
        rows += table_rows()
    if args.only in (None, "zero"):
        rows += zero_rows()
    print_table(rows)
    misses = [r["config"] for r in rows if not r["within_target"]]
    print(
        f"\n{len(rows) - len(misses)} of {len(rows)} configs within target; misses: {', '.join(misses) or 'none'}"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
