"""Training the RQ-VAE on the item embeddings: its own small loop, single process or DDP under torchrun.

    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml stages=[train]
    torchrun --standalone --nproc-per-node 2 -m data_pipeline semantic-ids \
        --config configs/data/beauty_semantic_ids.yaml stages=[train]          # DDP, gloo on CPU

Why not the main trainer (train/trainer.py): that loop is built around sequence batches, TorchRec
sharded tables and a DeepSpeed engine; an RQ-VAE is a 1M-parameter MLP on dense vectors that needs
none of them, but needs two things the trainer has no place for: k-means initialisation of the
codebooks on encoded data before the first step, and dead-code restarts between steps. So this is
a ~200-line loop that reuses the project's pieces instead: the config system (cluster/config.py,
the ``rqvae`` section of SemanticIdConfig), MLflow through ``train.tracking.make_tracker`` (rank 0
logs, other ranks get a NullTracker), and the project's atomic checkpoint pattern (write
``.tmp_step_N/``, then one ``os.replace``; resume from the newest complete one).

Data: the embedding Parquet files are read as (file, row group) units; rank r takes every
world_size-th unit (or, with fewer units than ranks, every world_size-th row), visits them in a
seeded random order per pass, and shuffles rows inside a buffer of ``rqvae.shuffle_buffer_rows``.
Memory is one buffer, not the catalogue. Every rank runs exactly ``rqvae.num_steps`` steps, so the
collectives always match. A resumed run continues the model, optimizer and step; its data order
restarts from a seed that depends on the step (not the exact position).

Metrics (MLflow and ``rqvae/metrics.jsonl``) every ``log_every_steps``: ``train/loss``,
``train/recon``, ``train/codebook``, ``train/commit``, per level ``train/usage_l{l}`` (share of codes
used in the window, over all ranks), ``train/perplexity_l{l}`` and ``train/restarted_l{l}``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist

from cluster.config import save_config, to_dict
from data_pipeline.semantic_ids.config import SemanticIdConfig
from data_pipeline.semantic_ids.embed import EMBED_DIR, read_embeddings_manifest
from data_pipeline.semantic_ids.rqvae import RqVae, RqVaeShape

logger = logging.getLogger(__name__)

RQVAE_DIR = "rqvae"
MODEL_FILE = "model.pt"
_PREFIX = "step_"


def embedding_files(output_dir: str | Path) -> tuple[list[Path], dict[str, Any]]:
    """The embedding Parquet files (in dense-id order) and their manifest."""
    manifest = read_embeddings_manifest(output_dir)
    root = Path(output_dir) / EMBED_DIR
    return [root / f["path"] for f in manifest["files"]], manifest


def _to_numpy(batch) -> np.ndarray:
    """float32 [rows, D] of a table's or record batch's ``embedding`` column (fixed-size lists)."""
    column = batch.column("embedding")
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, dim)


def stream_batches(
    files: list[Path], batch_size: int, buffer_rows: int, seed: int, rank: int = 0, world_size: int = 1
) -> Iterator[torch.Tensor]:
    """Endless float32 [batch_size, D] batches of this rank's share of the embeddings (see module doc)."""
    units = [(f, g) for f in files for g in range(pq.ParquetFile(f).num_row_groups)]
    if not units:
        raise ValueError(f"no embedding rows in {files}")
    stride_rows = len(units) < world_size
    mine = units if stride_rows else units[rank::world_size]
    rng = np.random.default_rng(seed + 1000003 * rank)
    buffer: list[np.ndarray] = []
    buffered = 0
    while True:  # one pass over this rank's units per iteration, in a new random order
        order = rng.permutation(len(mine))
        for j, i in enumerate(order):
            path, group = mine[i]
            x = _to_numpy(pq.ParquetFile(path).read_row_group(group, columns=["embedding"]))
            buffer.append(x[rank::world_size] if stride_rows else x)
            buffered += len(buffer[-1])
            if buffered < buffer_rows and j < len(order) - 1:
                continue
            rows = np.concatenate(buffer)
            rows = rows[rng.permutation(len(rows))]
            usable = len(rows) - len(rows) % batch_size
            for start in range(0, usable, batch_size):
                yield torch.from_numpy(rows[start : start + batch_size])
            # The rest waits for the next fill (a catalogue smaller than a batch accumulates passes).
            buffer, buffered = [rows[usable:]], len(rows) - usable


def _init_distributed(backend: str | None) -> tuple[int, int, torch.device]:
    """(rank, world_size, device): a process group under torchrun (RANK set), else one plain process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or ("nccl" if use_cuda else "gloo"), timeout=datetime.timedelta(minutes=30)
        )
    return dist.get_rank(), dist.get_world_size(), device


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t


def model_shape(cfg: SemanticIdConfig, input_dim: int) -> RqVaeShape:
    """The RQ-VAE architecture of this config for inputs of ``input_dim``."""
    r = cfg.rqvae
    return RqVaeShape(input_dim, tuple(r.hidden_dims), r.latent_dim, r.num_levels, r.codebook_size)


def save_model(model: RqVae, path: Path, extra: dict[str, Any]) -> None:
    """The model's weights and shape in one file, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"shape": vars(model.shape), "gradient": model.gradient, "beta": model.beta,
                "state_dict": model.state_dict(), **extra}, tmp)  # fmt: skip
    os.replace(tmp, path)


def load_model(path: str | Path) -> RqVae:
    """An RQ-VAE saved by ``save_model`` (the final ``rqvae/model.pt`` or a checkpoint's)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: run the train stage first (stages=[train]) with this output_dir"
        )
    blob = torch.load(path, map_location="cpu", weights_only=False)
    shape = dict(blob["shape"])
    shape["hidden_dims"] = tuple(shape["hidden_dims"])
    model = RqVae(RqVaeShape(**shape), beta=blob["beta"], gradient=blob["gradient"])
    model.load_state_dict(blob["state_dict"])
    return model.eval()


class _Checkpoints:
    """``rqvae/checkpoints/step_N/{model.pt, optim.pt}``: written to ``.tmp_step_N`` then renamed."""

    def __init__(self, root: Path, keep: int = 2):
        self.root, self.keep = root, keep

    def latest(self) -> Path | None:
        if not self.root.is_dir():
            return None
        done = sorted(
            p for p in self.root.iterdir() if p.name.startswith(_PREFIX) and (p / MODEL_FILE).is_file()
        )
        return done[-1] if done else None

    def save(self, step: int, model: RqVae, optimizer: torch.optim.Optimizer) -> Path:
        final, tmp = self.root / f"{_PREFIX}{step:08d}", self.root / f".tmp_{_PREFIX}{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        torch.save(optimizer.state_dict(), tmp / "optim.pt")
        save_model(model, tmp / MODEL_FILE, {"step": step})  # model.pt last: it marks completeness
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in sorted(p for p in self.root.iterdir() if p.name.startswith(_PREFIX))[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final


def train_rqvae(cfg: SemanticIdConfig) -> dict[str, Any]:
    """Run the train stage; returns the final metrics. Collective under torchrun."""
    from train.tracking import make_tracker

    r = cfg.rqvae
    rank, world_size, device = _init_distributed(r.backend)
    out = Path(cfg.output_dir).resolve()
    run_dir = out / RQVAE_DIR
    files, emb_manifest = embedding_files(out)
    shape = model_shape(cfg, int(emb_manifest["dim"]))
    if (run_dir / MODEL_FILE).is_file() and not cfg.overwrite:
        raise ValueError(
            f"{run_dir / MODEL_FILE} exists (a finished training); pass overwrite=true to train again"
        )
    if cfg.overwrite and rank == 0 and run_dir.exists():
        # A fresh training: drop the old model, checkpoints, curve and MLflow run link.
        shutil.rmtree(run_dir)
    if world_size > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    model = RqVae(shape, beta=r.beta, gradient=r.gradient).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    checkpoints = _Checkpoints(run_dir / "checkpoints")
    start_step = 0
    latest = checkpoints.latest() if r.resume == "auto" else None
    if latest is not None:
        blob = torch.load(latest / MODEL_FILE, map_location=device, weights_only=False)
        saved = {**blob["shape"], "hidden_dims": tuple(blob["shape"]["hidden_dims"])}
        if saved != vars(shape):
            raise ValueError(
                f"checkpoint {latest} is of another model ({saved}; this config: {vars(shape)}); "
                "set rqvae.resume=never or overwrite=true"
            )
        model.load_state_dict(blob["state_dict"])
        optimizer.load_state_dict(torch.load(latest / "optim.pt", map_location=device, weights_only=False))
        start_step = int(blob["step"])
        logger.info("rqvae: resumed from %s (step %d)", latest, start_step)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    tracker = make_tracker(cfg.tracking, rank=rank, run_dir=run_dir, default_uri=f"sqlite:///{out}/mlflow.db")
    tracker.set_tags({"stage": "rqvae", "world_size": str(world_size)})
    if start_step == 0:
        tracker.log_params(to_dict(cfg))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world_size > 1 else model
    batches = stream_batches(
        files, r.batch_size, r.shuffle_buffer_rows, cfg.seed + start_step, rank, world_size
    )
    generator = torch.Generator().manual_seed(cfg.seed + 7 * start_step)
    status = "FAILED"
    metrics: dict[str, float] = {}
    try:
        if not bool(model.quantizer.initialized):
            if r.kmeans_init:
                _kmeans_init(model, batches, r.kmeans_init_samples, r.kmeans_iters, cfg.seed, device, rank)
            else:
                model.quantizer.initialized.fill_(True)
        L, K = shape.num_levels, shape.codebook_size
        window_counts_LK = torch.zeros(L, K, dtype=torch.float64, device=device)
        log_counts_LK = torch.zeros(L, K, dtype=torch.float64, device=device)
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        restarted = [0] * L
        num_in_window, t0 = 0, time.perf_counter()
        metrics_file = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None  # noqa: SIM115
        for step in range(start_step + 1, r.num_steps + 1):
            x_BD = next(batches).to(device, non_blocking=True)
            out_ = ddp(x_BD)
            optimizer.zero_grad(set_to_none=True)
            out_["loss"].backward()
            optimizer.step()
            with torch.no_grad():
                for level in range(L):
                    counts = torch.bincount(out_["codes"][:, level], minlength=K).double()
                    window_counts_LK[level] += counts
                    log_counts_LK[level] += counts
                sums += torch.stack([out_[k].double() for k in ("loss", "recon", "codebook", "commit")])
                num_in_window += 1
            if r.restart_dead_codes and step % r.restart_every_steps == 0:
                _all_reduce(window_counts_LK)
                for level in range(L):
                    dead_K = window_counts_LK[level] < r.dead_code_threshold
                    restarted[level] += model.quantizer.restart_codes(
                        level, dead_K, out_["residuals"][:, level], generator
                    )
                window_counts_LK.zero_()
            if step % r.log_every_steps == 0 or step == r.num_steps:
                _all_reduce(log_counts_LK)
                _all_reduce(sums)
                mean = (sums / (num_in_window * world_size)).tolist()
                metrics = {
                    "train/loss": mean[0],
                    "train/recon": mean[1],
                    "train/codebook": mean[2],
                    "train/commit": mean[3],
                }
                for level in range(L):
                    c = log_counts_LK[level]
                    p = c / c.sum().clamp_min(1)
                    metrics[f"train/usage_l{level}"] = float((c > 0).double().mean())
                    metrics[f"train/perplexity_l{level}"] = float(
                        torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
                    )
                    metrics[f"train/restarted_l{level}"] = float(restarted[level])
                metrics["train/steps_per_s"] = num_in_window / max(time.perf_counter() - t0, 1e-9)
                tracker.log_metrics(metrics, step)
                if metrics_file is not None:
                    metrics_file.write(json.dumps({"step": step, **metrics}) + "\n")
                    metrics_file.flush()
                logger.info("rqvae step %d: loss %.4f recon %.5f usage %s", step, mean[0], mean[1],
                            [round(metrics[f"train/usage_l{lv}"], 3) for lv in range(L)])  # fmt: skip
                log_counts_LK.zero_()
                sums.zero_()
                restarted = [0] * L
                num_in_window, t0 = 0, time.perf_counter()
            if step % r.checkpoint_every_steps == 0 and step < r.num_steps and rank == 0:
                checkpoints.save(step, model, optimizer)
        if world_size > 1:
            # Restarts and k-means are broadcast and DDP averages gradients, so the replicas must agree.
            flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
            gathered = [torch.empty_like(flat) for _ in range(world_size)]
            dist.all_gather(gathered, flat)
            metrics["train/replica_max_abs_diff"] = max(
                float((g - gathered[0]).abs().max()) for g in gathered
            )
            tracker.log_metrics(
                {"train/replica_max_abs_diff": metrics["train/replica_max_abs_diff"]}, r.num_steps
            )
            if metrics_file is not None:
                metrics_file.write(json.dumps({"step": r.num_steps, **metrics}) + "\n")
        if metrics_file is not None:
            metrics_file.close()
        if rank == 0:
            save_model(model, run_dir / MODEL_FILE, {"step": r.num_steps, "seed": cfg.seed})
        if world_size > 1:
            dist.barrier()
        status = "FINISHED"
    finally:
        tracker.finish(status)
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()
    return metrics


@torch.no_grad()
def _kmeans_init(model: RqVae, batches: Iterator[torch.Tensor], num_samples: int, num_iters: int, seed: int,
                 device: torch.device, rank: int) -> None:  # fmt: skip
    """k-means of each level on rank 0's first ``num_samples`` encoded vectors (broadcast to all ranks).

    Every rank draws the same number of batches, so the data streams stay aligned."""
    xs, n = [], 0
    while n < num_samples:
        x = next(batches)
        xs.append(x)
        n += len(x)
    x_ND = torch.cat(xs)[:num_samples].to(device)
    z_NE = model.encode(x_ND)
    model.quantizer.kmeans_init(z_NE, num_iters, seed)
    logger.info(
        "rqvae: k-means initialised %d levels on %d vectors (rank %d's)",
        model.shape.num_levels,
        len(z_NE),
        rank,
    )
