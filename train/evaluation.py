"""Evaluation: every user of a split ranked by the task, metrics over all ranks, predictions written.

The maths lives in ``train/metrics.py`` (pure functions); this module holds the I/O around it: it
reads the prepared split, asks the task (``train/tasks``) for each row's target rank and top-k item
ids, accumulates HR/NDCG/MRR over ranks, and writes ``test_predictions.parquet`` (raw user id, raw
target id, top-k raw item ids in rank order), mapping dense ids back through the vocabularies that
the manifest names. It also computes the popularity baseline, the reference point of every number.

    evaluator = Evaluator(cfg, info, manifest)
    metrics = evaluator.run(task, dense_replica, "valid")
    metrics = evaluator.run(task, dense_replica, "test", predictions_path=run_dir / "test_predictions.parquet")
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from train.batch import split_last
from train.config import TrainConfig
from train.distributed import DistInfo, all_reduce_sum
from train.metrics import RetrievalMetrics, item_counts, popularity_ranks
from train.reader import SequenceDataset, load_manifest, raw_ids_by_dense, vocab_path
from train.tasks.base import Task


class Evaluator:
    """Runs a task's ranking over a split on every rank; rank 0 writes the predictions."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, manifest: dict):
        self.cfg, self.info, self.manifest = cfg, info, manifest
        self.data_dir = Path(cfg.data.dir)
        self.item_vocab_path = vocab_path(self.data_dir, manifest, "items")
        self.user_vocab_path = vocab_path(self.data_dir, manifest, "users")

    @torch.no_grad()
    def run(self, task: Task, dense: nn.Module, split: str, predictions_path: Path | None = None) -> dict:
        """Metrics of ``task`` on ``split`` over all ranks (a collective); optionally write predictions."""
        prepared = task.prepare_eval(dense)
        data = SequenceDataset(
            self.data_dir, split, self.cfg.data.eval_batch_size // self.info.world_size,
            rank=self.info.rank, world_size=self.info.world_size, shuffle=False, seed=self.cfg.run.seed,
        )  # fmt: skip
        metrics = RetrievalMetrics(self.cfg.eval.hr_at, self.cfg.eval.ndcg_at)
        top_k = self.cfg.eval.top_k if predictions_path is not None else None
        rows = []
        for batch in data:
            out = task.eval_batch(batch, prepared, top_k)
            if len(out.targets) == 0:
                continue
            metrics.update(out.ranks)
            if predictions_path is not None:
                rows.append(
                    (batch.user_ids[out.rows].numpy(), out.targets.numpy(), out.top_ids.cpu().numpy())
                )
        result = metrics.compute()
        counters = task.eval_counters(prepared)
        if counters:
            sums = all_reduce_sum([v for pair in counters.values() for v in pair], self.info.device)
            for i, name in enumerate(counters):
                result[name] = sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else float("nan")
        if predictions_path is not None:
            self._write_predictions(rows, predictions_path)
        return result

    def _write_predictions(self, rows: list, path: Path) -> None:
        """Per user: raw user id, raw target id, top-k raw item ids in rank order (rank 0 merges)."""
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
            item_raw = raw_ids_by_dense(self.item_vocab_path)
            user_raw = raw_ids_by_dense(self.user_vocab_path)
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


def evaluate_popularity(
    data_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 4096,
    ks_hr: Sequence[int] = (1, 10, 50, 200),
    ks_ndcg: Sequence[int] = (10, 50, 200),
) -> dict[str, float]:
    """Popularity baseline on ``split`` of a prepared data directory, item counts from its train split."""
    num_items = int(load_manifest(data_dir)["num_items"])
    counts = torch.zeros(num_items + 1, dtype=torch.long)
    for batch in SequenceDataset(data_dir, "train", batch_size, shuffle=False):
        counts += item_counts(batch.item_ids, num_items)
    metrics = RetrievalMetrics(ks_hr, ks_ndcg)
    for batch in SequenceDataset(data_dir, split, batch_size, shuffle=False):
        history, targets = split_last(batch)
        metrics.update(popularity_ranks(counts, targets, history.item_ids, history.offsets))
    return metrics.compute(all_reduce=False)
