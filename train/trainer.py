"""The training loop: sharded item table (TorchRec) + dense encoder (DeepSpeed) + eval + checkpoints.

A ``Trainer`` owns the pieces and has a handful of methods: ``train_step``, ``train``, ``evaluate``,
``state_dict`` / ``load_state_dict`` (via ``train/checkpoint.py``) and ``close``.

Gradient bookkeeping (the one subtle part). Each rank's loss is ``sum of its position losses *
world_size / global positions``: DeepSpeed averages dense gradients over ranks, which turns that into
the mean over all positions of the global batch. TorchRec *sums* the table gradients arriving from
every rank, so the lookups pass through ``_ScaleGrad(grad_accum / world_size)`` to get the same mean
(and undo DeepSpeed's 1/grad_accum). A data_parallel table is different: TorchRec's DDP *averages*
its gradients, so only the grad_accum factor applies. Hence one global objective whatever the world
size and sharding, which the sharded-vs-single-process test checks.

Randomness (negatives, dropout) is a function of (seed, step, rank), so a resumed run draws exactly
what the uninterrupted run would have drawn.

Shapes: T = tokens in the batch (jagged), B = rows, D = embedding dim, K = negatives, I = items + 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import NamedTuple

import deepspeed
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from cluster.config import flatten, save_config, to_dict
from cluster.preemption import PreemptionHandler, mark_stopped
from train import checkpoint as ckpt
from train.batch import SequenceBatch
from train.config import TrainConfig
from train.distributed import DistInfo, all_reduce_sum
from train.embeddings import build_item_table, gather_full_table, lookup
from train.metrics import RetrievalMetrics, evaluate_popularity, rank_of_targets, topk_items
from train.models import (
    build_encoder,
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_negatives,
    sampled_softmax_loss,
)
from train.reader import SequenceDataset, load_manifest
from train.run_lock import acquire_run_lock
from train.tracking import default_tags, log_dataset_input, log_recommender_model, make_tracker
from train.zero import build_engine, deepspeed_config

logger = logging.getLogger(__name__)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


class ModelInputs(NamedTuple):
    """One batch cut into what the encoder and the loss take (``split_inputs_targets``)."""

    input_ids: Tensor  # [T] the jagged inputs
    offsets: Tensor  # [B+1] row boundaries of input_ids
    timestamps: Tensor | None  # [T] each input's time
    target_timestamps: Tensor | None  # [T] the time of the item after each input (even if last_only)
    targets: Tensor  # [T] the next item of each input, or [B] each row's last item (last_only)
    keep_rows: Tensor  # [rows of the batch] bool: the rows kept (those with at least 2 items)

    def times_on(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """``(timestamps, target_timestamps)`` on ``device``; None stays None (data without times)."""
        return tuple(None if t is None else t.to(device) for t in (self.timestamps, self.target_timestamps))


def split_inputs_targets(batch: SequenceBatch, max_seq_len: int, last_only: bool) -> ModelInputs:
    """Cut stored rows into model inputs and targets (docs/data_format.md).

    Rows are first cut to their most recent ``max_seq_len + 1`` items. Inputs are each row without
    its last item; targets are each row without its first (``last_only``: only the last item, for
    eval). Rows with fewer than 2 items are dropped.
    """
    lengths = batch.lengths
    keep_rows = lengths >= 2
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(len(batch.item_ids)) - batch.offsets[:-1][row_of]
    cut = torch.clamp(lengths - (max_seq_len + 1), min=0)
    keep = (pos >= cut[row_of]) & keep_rows[row_of]
    last = pos == (lengths - 1)[row_of]
    after_first = keep & ~(pos == cut[row_of])  # each kept row without its first item
    in_mask = keep & ~last
    input_ids = batch.item_ids[in_mask]
    in_lengths = (torch.minimum(lengths, torch.full_like(lengths, max_seq_len + 1)) - 1).clamp(min=0)
    in_lengths = in_lengths[keep_rows]
    offsets = torch.zeros(len(in_lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(in_lengths, 0)
    ts = target_ts = None
    if batch.timestamps is not None:
        ts, target_ts = batch.timestamps[in_mask], batch.timestamps[after_first]
    targets = batch.item_ids[keep & last] if last_only else batch.item_ids[after_first]
    return ModelInputs(input_ids, offsets, ts, target_ts, targets, keep_rows)


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    """Builds everything from a ``TrainConfig`` on an initialised process group."""

    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.device = info.device
        self.output_dir = Path(cfg.run.output_dir)
        self.manifest = load_manifest(cfg.data.dir)
        self.num_items = int(self.manifest["num_items"])
        self.has_timestamps = bool(self.manifest.get("has_timestamps", False))
        if cfg.model.name == "hstu" and cfg.model.use_time_bias and not self.has_timestamps:
            logger.warning(
                "%s has no timestamps: HSTU's relative attention bias uses positions only", cfg.data.dir
            )
        for key in ("batch_size", "eval_batch_size"):
            if getattr(cfg.data, key) % info.world_size:
                raise ValueError(
                    f"data.{key}={getattr(cfg.data, key)} is the global batch; it must be divisible by the "
                    f"world size {info.world_size}"
                )
        self.max_seq_len = cfg.model.max_seq_len

        self.table = build_item_table(
            cfg.embeddings, self.num_items, cfg.model.embedding_dim, self.device, cfg.run.seed
        )
        torch.manual_seed(cfg.run.seed)  # identical dense init on every rank
        encoder = build_encoder(cfg.model).to(self.device)

        # train_valid trains on the valid rows (every item but the test target); see DataConfig.
        train_split = ["valid" if cfg.data.train_split == "train_valid" else "train"]
        if cfg.data.older_windows:
            if "older" not in self.manifest.get("splits", {}):
                raise ValueError(
                    f"data.older_windows=true but {cfg.data.dir} has no 'older' split; prepare it again with "
                    "split.older_windows=true (python -m data_pipeline prepare --config ... "
                    "split.older_windows=true), or set data.older_windows=false"
                )
            train_split.append("older")
        self.train_data = SequenceDataset(
            cfg.data.dir, train_split, cfg.data.batch_size // info.world_size, rank=info.rank,
            world_size=info.world_size, num_workers=cfg.data.num_workers, shuffle=cfg.data.shuffle,
            seed=cfg.run.seed, partition=cfg.data.partition,
        )  # fmt: skip
        local_batches = self.train_data.num_batches_for_rank()
        self.steps_per_epoch = int(self._all_reduce(torch.tensor([local_batches]), dist.ReduceOp.MIN).item())
        total_steps = cfg.run.epochs * self.steps_per_epoch // cfg.optim.grad_accum_steps
        self.ds_config = deepspeed_config(cfg, info.world_size, self.device)
        self.engine = build_engine(encoder, cfg, self.ds_config, total_steps)
        self.dense_dtype = next(self.engine.module.parameters()).dtype

        self.step = 0  # micro-steps (batches) done in total
        self.epoch = 0
        self.batches_in_epoch = 0
        self.best_metric = -math.inf
        self.best_step = -1
        self.evals_without_improvement = 0
        self.history: list[dict] = []
        # Wall time spent in this run, carried across resumes (up to the checkpoint resumed from).
        self.elapsed_s = 0.0
        self._clock_start = time.perf_counter()
        self.last_grad_norm: float | None = None

        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.run_lock = acquire_run_lock(self.output_dir, info.is_main, self.device)  # before any write
        self.preemption = PreemptionHandler().install()
        self.checkpoints = ckpt.CheckpointManager(self.output_dir / "checkpoints", cfg.run.keep_checkpoints)
        default_uri = f"sqlite:///{self.output_dir.resolve().parent / 'mlflow.db'}"
        self.tracker = make_tracker(
            cfg.tracking, rank=info.rank, run_dir=self.output_dir, default_uri=default_uri
        )

    # ------------------------------------------------------------------------------------ helpers

    def _all_reduce(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        t = t.to(self.device)
        dist.all_reduce(t, op=op)
        return t.cpu()

    def _seed_step(self, step: int) -> None:
        torch.manual_seed(self.cfg.run.seed * 1_000_003 + step * 1009 + self.info.rank)

    def describe(self) -> dict:
        """What is written to the run directory and MLflow at the start."""
        return {
            "sharding_plan": self.table.plan_text(),
            "deepspeed_config": self.ds_config,
            "num_items": self.num_items,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.info.world_size,
            # ZeRO-3 partitions parameters; ds_numel is the full size.
            "num_dense_params": sum(
                getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()
            ),
        }

    # ------------------------------------------------------------------------------------- train

    def train_step(self, batch: SequenceBatch, num_global_positions: int) -> dict:
        """One forward/backward/step on this rank's batch; the loss is the global-batch mean."""
        cfg, world = self.cfg, self.info.world_size
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=False)
        input_ids, offsets, targets = inputs.input_ids, inputs.offsets, inputs.targets
        in_lengths = offsets[1:] - offsets[:-1]
        num_rows = len(in_lengths)
        gen = torch.Generator()
        neg_ids = torch.empty(0, dtype=torch.long)
        if cfg.loss.negatives == "shared":  # same draw on every rank: one global set per step
            gen.manual_seed(cfg.run.seed * 7919 + self.step)
            neg_ids = sample_negatives(self.num_items, (cfg.loss.num_negatives,), gen)
        elif cfg.loss.negatives == "full":  # every item: the exact softmax
            neg_ids = torch.arange(1, self.num_items + 1, dtype=torch.long)
        elif cfg.loss.negatives == "per_position":
            gen.manual_seed(cfg.run.seed * 7919 + self.step * 1009 + self.info.rank)
            neg_ids = sample_negatives(self.num_items, (len(targets), cfg.loss.num_negatives), gen)
        self._seed_step(self.step)
        # One lookup per distinct id (inputs, targets and negatives overlap heavily), then local indexing;
        # the index backward sums the repeats' gradients before they reach the table.
        unique_ids, inverse = torch.unique(
            torch.cat([input_ids, targets, neg_ids.reshape(-1)]), return_inverse=True
        )
        # Model-parallel tables sum the ranks' gradients (so divide by world); DDP averages data_parallel ones.
        sparse_scale = cfg.optim.grad_accum_steps / (world if self.table.grad_sum_over_ranks else 1)
        if self.ds_config["fp16"]["enabled"]:
            sparse_scale /= float(getattr(self.engine.optimizer, "cur_scale", 1.0))
        emb_UD = _ScaleGrad.apply(lookup(self.table, unique_ids, self.device), sparse_scale)
        inverse = inverse.to(self.device)
        num_inputs, num_targets = len(input_ids), len(targets)
        seq_emb = emb_UD[inverse[:num_inputs]].to(self.dense_dtype)
        tgt_emb = emb_UD[inverse[num_inputs : num_inputs + num_targets]]
        neg_emb = emb_UD[inverse[num_inputs + num_targets :]].view(*neg_ids.shape, -1)

        max_len = int(in_lengths.max().item()) if num_rows else 0
        query = self.engine(seq_emb, offsets.to(self.device), max_len, *inputs.times_on(self.device))
        query = query.float()
        targets_d = targets.to(self.device)
        if cfg.loss.negatives == "in_batch":
            loss_sum, num = in_batch_softmax_loss(query, tgt_emb, targets_d, cfg.loss.temperature)
        elif cfg.loss.negatives == "full":  # neg_emb holds items 1..I in id order
            loss_sum, num = full_softmax_loss(query, neg_emb, targets_d, cfg.loss.temperature)
        else:
            loss_sum, num = sampled_softmax_loss(
                query, tgt_emb, targets_d, neg_emb, neg_ids.to(self.device), cfg.loss.temperature
            )
        loss = loss_sum * (world / max(1, num_global_positions))
        self.engine.backward(loss)
        grad_norm = None
        if self.cfg.zero.stage == 0 and self.engine.is_gradient_accumulation_boundary():
            # DeepSpeed reports the global norm only when ZeRO or clipping computes it.
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            grad_norm = float(
                torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            )
        self.engine.step()
        self._sync_table_lr()
        self.table.step()
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        self.last_grad_norm = None if grad_norm is None else float(grad_norm)
        return {"loss_sum": float(loss_sum.detach()), "positions": int(num)}

    def _sync_table_lr(self) -> None:
        """Give the table the dense schedule's current factor (``embeddings.schedule=dense``).

        Called after each dense step, so the next update of the table (a fused one happens inside the
        next backward) uses the same multiplier of its base LR as the dense optimizer.
        """
        emb = self.cfg.embeddings
        factor = self.engine.get_lr()[0] / self.cfg.optim.lr if emb.schedule == "dense" else 1.0
        self.table.set_lr(emb.lr * factor)

    def _make_progress(self, total: int):
        mode = self.cfg.run.progress_bar
        show = self.info.is_main and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(
            total=total, initial=self.batches_in_epoch, desc=f"epoch {self.epoch}", dynamic_ncols=True
        )

    def train(self) -> dict:
        """Run epochs from the current state; evaluate, checkpoint, early-stop; test with the best checkpoint."""
        cfg = self.cfg
        info = self.describe()
        if self.info.is_main:
            (self.output_dir / "sharding_plan.txt").write_text(info["sharding_plan"] + "\n")
            (self.output_dir / "deepspeed_config.json").write_text(json.dumps(self.ds_config, indent=2))
            save_config(cfg, self.output_dir / "config.yaml")
        logger.info("sharding plan:\n%s", info["sharding_plan"])
        logger.info(
            "%d items, %d dense params, %d steps/epoch, world size %d (backend %s, %s), negatives=%s",
            self.num_items, info["num_dense_params"], self.steps_per_epoch, self.info.world_size,
            self.info.backend, self.device, cfg.loss.describe(),
        )  # fmt: skip
        if self.step == 0:
            self.tracker.log_params(flatten(to_dict(cfg)))
        self.tracker.set_tags(default_tags(self.info.world_size))
        for name in ("config.yaml", "deepspeed_config.json", "sharding_plan.txt"):
            self.tracker.log_artifact(self.output_dir / name)

        self._sync_table_lr()  # the schedule's value at the current (possibly resumed) step
        stopped_early = False
        max_steps = cfg.run.max_steps
        while self.epoch < cfg.run.epochs and not stopped_early:
            self.train_data.set_epoch(self.epoch)
            if self.batches_in_epoch:
                self.train_data.load_state_dict(
                    {"epoch": self.epoch, "batches_consumed": self.batches_in_epoch}
                )
            loader = iter(self.train_data.loader())
            bar = self._make_progress(self.steps_per_epoch)
            window_loss, window_pos, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
            epoch_rows, epoch_tokens, preempted = 0, 0, False
            while True:
                if max_steps and self.step >= max_steps:
                    break
                batch = next(loader, None)
                n_local = (
                    int((batch.lengths.clamp(max=self.max_seq_len + 1) - 1).clamp(min=0).sum())
                    if batch
                    else 0
                )
                has, n_global = all_reduce_sum(
                    [1.0 if batch is not None else 0.0, float(n_local)], self.device
                )
                if has < self.info.world_size:  # some rank is out of data: the epoch ends for all
                    break
                out = self.train_step(batch, int(n_global))
                self.step += 1
                self.batches_in_epoch += 1
                window_loss += out["loss_sum"]
                window_pos += out["positions"]
                window_tokens += int(batch.lengths.sum())
                epoch_rows += len(batch.lengths)
                epoch_tokens += int(batch.lengths.sum())
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{out['loss_sum'] / max(1, out['positions']):.4f}")
                if self.step % cfg.run.log_every_steps == 0:
                    self._log_train_window(
                        window_loss, window_pos, window_tokens, time.perf_counter() - window_t0
                    )
                    window_loss, window_pos, window_tokens, window_t0 = 0.0, 0, 0, time.perf_counter()
                if cfg.run.checkpoint_every_steps and self.step % cfg.run.checkpoint_every_steps == 0:
                    self.save_checkpoint()
                if self.preemption.should_stop(self.device):  # all ranks agree on the step
                    preempted = True
                    break
            if bar is not None:
                bar.close()
            if preempted:
                self.save_checkpoint()
                mark_stopped(self.step, self.output_dir, self.info.is_main)
                self.tracker.finish("KILLED")  # the requeued job reopens the run
                return {}
            if max_steps and self.step >= max_steps and self.batches_in_epoch < self.steps_per_epoch:
                self.save_checkpoint()
                logger.info("stopping at run.max_steps=%d (mid-epoch); resume=auto continues", max_steps)
                return {}
            rows, tokens = all_reduce_sum([epoch_rows, epoch_tokens], self.device)
            logger.info("epoch %d done: %d rows, %d items of the %s split (counted from the resume "
                        "point if the epoch resumed mid-way)", self.epoch + 1, rows, tokens, self.train_data.split)  # fmt: skip
            self.epoch += 1
            self.batches_in_epoch = 0
            if self.epoch % cfg.eval.every_epochs == 0 or self.epoch == cfg.run.epochs:
                stopped_early = self._validate()
            self.save_checkpoint()
            if max_steps and self.step >= max_steps:
                logger.info("stopping at run.max_steps=%d; resume=auto continues", max_steps)
                return {}
        return self.finish()

    def _log_train_window(self, loss_sum: float, positions: int, tokens: int, seconds: float) -> None:
        loss_sum, positions, tokens = all_reduce_sum([loss_sum, positions, tokens], self.device)
        metrics = {
            "train/loss": loss_sum / max(1.0, positions),
            "train/lr": self.engine.get_lr()[0],
            "train/table_lr": self.table.lr,
            "train/tokens_per_s": tokens / max(seconds, 1e-9),
            "train/peak_memory_mib": peak_memory_mib(self.device),
            "train/epoch": self.epoch + self.batches_in_epoch / max(1, self.steps_per_epoch),
        }
        if self.last_grad_norm is not None:
            metrics["train/grad_norm"] = self.last_grad_norm
        self._record(metrics)
        logger.info(
            "step %d | epoch %.2f | loss %.4f | lr %.2e | grad_norm %s | %.0f tokens/s | peak %.0f MiB",
            self.step, metrics["train/epoch"], metrics["train/loss"], metrics["train/lr"],
            f"{metrics['train/grad_norm']:.3f}" if "train/grad_norm" in metrics else "n/a",
            metrics["train/tokens_per_s"], metrics["train/peak_memory_mib"],
        )  # fmt: skip

    def _record(self, metrics: dict) -> None:
        """Log to MLflow and append to ``<output_dir>/metrics.jsonl`` (rank 0), one JSON line per call."""
        self.tracker.log_metrics(metrics, step=self.step)
        record = {"step": self.step, "elapsed_s": round(self.elapsed(), 3), **metrics}
        self.history.append(record)
        if self.info.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def elapsed(self) -> float:
        """Seconds of this run so far (setup, training and evaluation), summed over resumed jobs."""
        return self.elapsed_s + time.perf_counter() - self._clock_start

    def _validate(self) -> bool:
        """Evaluate on valid; track the best; return True when early stopping triggers.

        Under ``data.train_split=train_valid`` nothing is held out: this evaluates test for the curve
        only (as the reference code does), tracks no best, and never stops early.
        """
        if self.cfg.data.train_split == "train_valid":
            metrics = self.evaluate("test")
            self._record({f"test/{k}": v for k, v in metrics.items()})
            logger.info("epoch %d test (curve only, not used for selection): %s", self.epoch, _fmt(metrics))
            return False
        metrics = self.evaluate("valid")
        self._record({f"valid/{k}": v for k, v in metrics.items()})
        logger.info("epoch %d valid: %s", self.epoch, _fmt(metrics))
        value = metrics[self.cfg.eval.metric]
        if value > self.best_metric:
            self.best_metric, self.best_step, self.evals_without_improvement = value, self.step, 0
        else:
            self.evals_without_improvement += 1
        patience = self.cfg.eval.patience
        if patience and self.evals_without_improvement >= patience:
            logger.info(
                "early stopping: %s has not improved for %d evaluations", self.cfg.eval.metric, patience
            )
            return True
        return False

    # -------------------------------------------------------------------------------------- eval

    def _eval_encoder(self) -> torch.nn.Module:
        """A plain (hook-free) copy of the dense encoder with full parameters, in eval mode.

        Under ZeRO-3 the engine's parameters are partitioned and its forward is a collective; a
        local replica lets every rank evaluate its own users without matching the others call for call.
        """
        replica = build_encoder(self.cfg.model).to(self.device)
        params = list(self.engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.cfg.zero.stage == 3):
            replica.load_state_dict(
                {k: v.detach().float() for k, v in self.engine.module.state_dict().items()}
            )
        return replica.eval()

    @torch.no_grad()
    def evaluate(self, split: str, predictions_path: Path | None = None) -> dict:
        """Retrieval over all items (history excluded) for every user of ``split``, over all ranks."""
        # Inputs take the raw rows, as in training; scores use the L2-normalised rows, as the loss does.
        raw_ID = gather_full_table(self.table, self.device).float()
        table_ID = F.normalize(raw_ID, dim=-1)
        encoder = self._eval_encoder()
        data = SequenceDataset(
            self.cfg.data.dir, split, self.cfg.data.eval_batch_size // self.info.world_size,
            rank=self.info.rank, world_size=self.info.world_size, shuffle=False, seed=self.cfg.run.seed,
        )  # fmt: skip
        metrics = RetrievalMetrics()
        rows = []
        for batch in data:
            inputs = split_inputs_targets(batch, self.max_seq_len, last_only=True)
            input_ids, offsets, targets = inputs.input_ids, inputs.offsets, inputs.targets
            if len(targets) == 0:
                continue
            input_ids_d, offsets_d = input_ids.to(self.device), offsets.to(self.device)
            max_len = int((offsets[1:] - offsets[:-1]).max())
            query_TD = encoder(raw_ID[input_ids_d], offsets_d, max_len, *inputs.times_on(self.device))
            query_BD = query_TD[offsets_d[1:] - 1]
            scores_BI = query_BD @ table_ID.T
            targets_d = targets.to(self.device)
            metrics.update(rank_of_targets(scores_BI, targets_d, input_ids_d, offsets_d))
            if predictions_path is not None:
                # The target is never excluded (as in rank_of_targets), so the file reproduces the metrics.
                top = topk_items(scores_BI, input_ids_d, offsets_d, k=min(self.cfg.eval.top_k, self.num_items),
                                 keep_ids=targets_d)  # fmt: skip
                rows.append((batch.user_ids[inputs.keep_rows].numpy(), targets.numpy(), top.cpu().numpy()))
        result = metrics.compute()
        if predictions_path is not None:
            self._write_predictions(rows, predictions_path)
        return result

    def _write_predictions(self, rows: list, path: Path) -> None:
        """Per test user: raw user id, raw target id, top-k raw item ids in rank order (rank 0 merges)."""
        users = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
        targets = np.concatenate([r[1] for r in rows]) if rows else np.zeros(0, np.int64)
        k = self.cfg.eval.top_k
        top = np.concatenate([r[2] for r in rows]) if rows else np.zeros((0, k), np.int64)
        part = path.with_name(f".{path.stem}.rank{self.info.rank}.npz")
        np.savez(part, users=users, targets=targets, top=top)
        dist.barrier()
        if self.info.is_main:
            parts = [
                np.load(path.with_name(f".{path.stem}.rank{r}.npz")) for r in range(self.info.world_size)
            ]
            users = np.concatenate([p["users"] for p in parts])
            targets = np.concatenate([p["targets"] for p in parts])
            top = np.concatenate([p["top"] for p in parts])
            order = np.argsort(users, kind="stable")
            item_raw = _vocab(Path(self.cfg.data.dir) / "vocab" / "items.parquet")
            user_raw = _vocab(Path(self.cfg.data.dir) / "vocab" / "users.parquet")
            top = top[order]
            table = pa.table(
                {
                    "user_id": pa.array(user_raw[users[order]]),
                    "target_item_id": pa.array(item_raw[targets[order]]),
                    "top_item_ids": pa.array(list(item_raw[top])),
                }
            )
            tmp = path.with_suffix(".parquet.tmp")
            pq.write_table(table, tmp)
            os.replace(tmp, path)
            for r in range(self.info.world_size):
                path.with_name(f".{path.stem}.rank{r}.npz").unlink(missing_ok=True)
        dist.barrier()

    # ---------------------------------------------------------------------------- checkpointing

    def trainer_state(self) -> dict:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "evals_without_improvement": self.evals_without_improvement,
            "history": self.history,
            "elapsed_s": self.elapsed(),
        }

    def load_trainer_state(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self._clock_start = time.perf_counter()

    def checkpoint_meta(self) -> dict:
        m = self.cfg.model
        return {
            "model": m.name,
            "embedding_dim": m.embedding_dim,
            "num_blocks": m.num_blocks,
            "num_heads": m.num_heads,
            "num_items": self.num_items,
            "world_size": self.info.world_size,
            "zero_stage": self.cfg.zero.stage,
        }

    def save_checkpoint(self) -> None:
        self.checkpoints.save(self.step, self.table, self.engine, self.trainer_state(), self.checkpoint_meta(),
                              protect_step=self.best_step)  # fmt: skip

    def maybe_resume(self) -> bool:
        """Apply ``run.resume``: auto (latest in output_dir), never, or an explicit checkpoint path."""
        resume = self.cfg.run.resume
        if resume == "never":
            return False
        path = self.checkpoints.latest() if resume == "auto" else Path(resume)
        if path is None:
            return False
        state = self.checkpoints.load(path, self.table, self.engine, self.checkpoint_meta())
        saved_world = json.loads((Path(path) / "meta.json").read_text()).get("world_size")
        if saved_world != self.info.world_size and state.get("batches_in_epoch"):
            # The reader position belongs to the old rank layout; the epoch restarts on the new one.
            logger.warning("world size changed (%s -> %d): epoch %d restarts from its first batch",
                           saved_world, self.info.world_size, state["epoch"])  # fmt: skip
            state["batches_in_epoch"] = 0
        self.load_trainer_state(state)
        logger.info(
            "resumed from %s (step %d, epoch %d, batch %d)",
            path,
            self.step,
            self.epoch,
            self.batches_in_epoch,
        )
        return True

    # ------------------------------------------------------------------------------------ finish

    def finish(self) -> dict:
        """Test with the best checkpoint, write final_metrics.json + predictions, log to MLflow."""
        best = self.checkpoints.path_for(self.best_step) if self.best_step >= 0 else None
        if best is not None and best.exists() and self.best_step != self.step:
            logger.info("loading the best checkpoint (step %d, valid %s=%.4f) for test", self.best_step,
                        self.cfg.eval.metric, self.best_metric)  # fmt: skip
            self.checkpoints.load(
                best, self.table, self.engine, self.checkpoint_meta(), dense_module_only=True
            )
        valid = self.evaluate("valid")
        test = self.evaluate("test", predictions_path=self.output_dir / "test_predictions.parquet")
        final = {
            "test": test,
            "valid": valid,
            "best_step": self.best_step,
            "steps": self.step,
            "epochs": self.epoch,
            "elapsed_s": self.elapsed(),
            "loss": {"negatives": self.cfg.loss.negatives, "num_negatives": self.cfg.loss.num_negatives},
            # train_valid: the valid rows were trained on, so "valid" is not held out.
            "train_split": self.cfg.data.train_split,
            "older_windows": self.cfg.data.older_windows,
        }
        logger.info("test: %s", _fmt(test))
        if self.cfg.tracking.log_model:  # collectives: every rank gathers, rank 0 logs
            log_table, log_encoder = gather_full_table(self.table, self.device), self._eval_encoder()
        if self.info.is_main:
            if self.cfg.tracking.log_dataset:
                log_dataset_input(self.tracker, self.cfg.data.dir, self.manifest)
            if self.cfg.tracking.log_model:
                log_recommender_model(self.tracker, encoder=log_encoder, item_table_ID=log_table,
                                      config_path=self.output_dir / "config.yaml", data_dir=self.cfg.data.dir)  # fmt: skip
            # The reference point every number should be read against (counts from the train split).
            final["popularity_test"] = evaluate_popularity(self.cfg.data.dir, "test")
            logger.info("popularity baseline, test: %s", _fmt(final["popularity_test"]))
            path = self.output_dir / "final_metrics.json"
            path.write_text(json.dumps(final, indent=2))
            self.tracker.log_metrics({f"test/{k}": v for k, v in test.items()}, step=self.step)
            self.tracker.log_artifact(path)
            self.tracker.log_artifact(self.output_dir / "test_predictions.parquet")
            self.tracker.log_figure_of_history()
        return final

    def close(self, status: str = "FINISHED") -> None:
        """End the tracked run and release the DeepSpeed engine: ``destroy`` removes its gradient hooks,
        which otherwise keep it, and the process groups its parameters hold, alive (see
        ``destroy_distributed``; under ZeRO-3 DeepSpeed still keeps it)."""
        self.tracker.finish(status)
        self.engine.destroy()


def _vocab(path: Path) -> np.ndarray:
    """Dense id -> raw id (index 0 = padding, as an empty string)."""
    t = pq.read_table(path, columns=["raw_id", "dense_id"])
    dense = t.column("dense_id").to_numpy()
    out = np.empty(int(dense.max()) + 1, dtype=object)
    out[0] = ""
    out[dense] = np.array(t.column("raw_id").to_pylist(), dtype=object)
    return out


def _fmt(metrics: dict) -> str:
    return " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
