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

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn

from train.batch import SequenceBatch, jagged_concat, split_last
from train.config import TrainConfig
from train.distributed import DistInfo, all_reduce_sum
from train.metrics import RetrievalMetrics, item_counts, popularity_ranks
from train.reader import SequenceDataset, load_manifest, raw_id_column, vocab_path
from train.tasks.base import Task

logger = logging.getLogger(__name__)


class Evaluator:
    """Runs a task's ranking over a split on every rank; rank 0 writes the predictions."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, manifest: dict):
        self.cfg, self.info, self.manifest = cfg, info, manifest
        self.data_dir = Path(cfg.data.dir)
        self.item_vocab_path = vocab_path(self.data_dir, manifest, "items")
        self.user_vocab_path = vocab_path(self.data_dir, manifest, "users")
        self._history: UserHistory | None = None

    @property
    def history(self) -> UserHistory:
        """Every user's items in the train and older splits (built on first use, for all_history)."""
        if self._history is None:
            self._history = UserHistory.from_splits(self.data_dir, self.manifest)
        return self._history

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
        writer = (
            None if predictions_path is None else _PredictionParts(predictions_path, self.info.rank, top_k)
        )
        # Cold-start split (data_pipeline split.cold_items_fraction): the test users whose target was
        # held out of training are also scored on their own, as test/cold/*.
        cold = self._cold_items() if split == "test" else None
        cold_metrics = (
            RetrievalMetrics(self.cfg.eval.hr_at, self.cfg.eval.ndcg_at) if cold is not None else None
        )
        lockstep = task.eval_in_lockstep()
        batches = iter(data)
        while True:
            batch = next(batches, None)
            # A lockstep task's eval_batch is a collective: go on until every rank has run out.
            if lockstep and all_reduce_sum([float(batch is not None)], self.info.device)[0] == 0:
                break
            if batch is None and not lockstep:
                break
            exclude = None
            if batch is not None and self.cfg.eval.exclude == "all_history":
                exclude = self.history.exclusions(batch)
            out = task.eval_batch(batch, prepared, top_k, exclude)
            if out is None or len(out.targets) == 0:
                continue
            metrics.update(out.ranks)
            if cold_metrics is not None:
                cold_metrics.update(out.ranks[cold[out.targets]])
            if writer is not None:
                writer.add(batch.user_ids[out.rows].numpy(), out.targets.numpy(), out.top_ids.cpu().numpy())
        result = metrics.compute()
        if cold_metrics is not None:
            result.update({f"cold/{k}": v for k, v in cold_metrics.compute().items()})
        counters = task.eval_counters(prepared)
        if counters:
            sums = all_reduce_sum([v for pair in counters.values() for v in pair], self.info.device)
            for i, name in enumerate(counters):
                result[name] = sums[2 * i] / sums[2 * i + 1] if sums[2 * i + 1] else float("nan")
        if writer is not None:
            writer.close()
            self._write_predictions(predictions_path)
        return result

    def _cold_items(self) -> torch.Tensor | None:
        """Bool over dense item ids 0..num_items: held out of training by the cold-start split; None without one."""
        entry = self.manifest.get("cold_items")
        if not entry:
            return None
        ids = pq.read_table(self.data_dir / entry["path"])["dense_id"].to_numpy()
        mask = torch.zeros(int(self.manifest["num_items"]) + 1, dtype=torch.bool)
        mask[torch.from_numpy(ids)] = True
        return mask

    def _write_predictions(self, path: Path, chunk_rows: int = 65536) -> None:
        """Per user: raw user id, raw target id, top-k raw item ids in rank order (rank 0 merges).

        Memory stays O(users) on rank 0 (the sort order), not O(users x k): the ranks' top-k lists
        are memory-mapped and written to Parquet ``chunk_rows`` users at a time, in user order.
        """
        dist.barrier()
        if self.info.is_main:
            parts = [_PredictionParts.open(path, r, self.cfg.eval.top_k) for r in range(self.info.world_size)]
            users = np.concatenate([p[0] for p in parts])
            targets = np.concatenate([p[1] for p in parts])
            starts = np.cumsum([0] + [len(p[0]) for p in parts])
            order = np.argsort(users, kind="stable")
            item_raw = raw_id_column(self.item_vocab_path)
            user_raw = raw_id_column(self.user_vocab_path)
            k = max(p[2].shape[1] for p in parts)
            tmp = path.with_suffix(".parquet.tmp")
            writer = None
            for c in range(0, max(1, len(order)), chunk_rows):
                idx = order[c : c + chunk_rows]
                top = np.zeros((len(idx), k), np.int64)
                for r, (_, _, top_r) in enumerate(parts):  # rows of rank r in this chunk, read from its map
                    mine = (idx >= starts[r]) & (idx < starts[r + 1])
                    top[mine, : top_r.shape[1]] = top_r[idx[mine] - starts[r]]
                offsets = pa.array(np.arange(len(idx) + 1, dtype=np.int32) * k)
                table = pa.table(
                    {
                        "user_id": user_raw.take(pa.array(users[idx])),
                        "target_item_id": item_raw.take(pa.array(targets[idx])),
                        "top_item_ids": pa.ListArray.from_arrays(
                            offsets, item_raw.take(pa.array(top.ravel()))
                        ),
                    }
                )
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
            writer.close()
            os.replace(tmp, path)
            for r in range(self.info.world_size):
                _PredictionParts.remove(path, r)
        dist.barrier()


class _PredictionParts:
    """One rank's predictions on disk while it evaluates: top-k rows appended to a raw int64 file
    (so no rank holds users x k in memory), user and target ids kept (O(users))."""

    def __init__(self, path: Path, rank: int, k: int):
        self.path, self.rank, self.k = path, rank, k
        self.users: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.top_file = open(self._name(path, rank, "top.bin"), "wb")  # noqa: SIM115 (closed in close())

    @staticmethod
    def _name(path: Path, rank: int, what: str) -> Path:
        return path.with_name(f".{path.stem}.rank{rank}.{what}")

    def add(self, users: np.ndarray, targets: np.ndarray, top: np.ndarray) -> None:
        self.users.append(users.astype(np.int64))
        self.targets.append(targets.astype(np.int64))
        self.top_file.write(np.ascontiguousarray(top, dtype=np.int64).tobytes())

    def close(self) -> None:
        self.top_file.close()
        empty = np.zeros(0, np.int64)
        np.save(
            self._name(self.path, self.rank, "users.npy"), np.concatenate(self.users) if self.users else empty
        )
        np.save(
            self._name(self.path, self.rank, "targets.npy"),
            np.concatenate(self.targets) if self.targets else empty,
        )

    @classmethod
    def open(cls, path: Path, rank: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(users, targets, top [n, width] memory-mapped)`` of a rank's closed parts (``k`` if empty)."""
        users = np.load(cls._name(path, rank, "users.npy"))
        targets = np.load(cls._name(path, rank, "targets.npy"))
        top_path = cls._name(path, rank, "top.bin")
        if not len(users):
            return users, targets, np.zeros((0, k), np.int64)
        # The lists' width is the task's (retrieval: min(top_k, num_items)), read back from the file size.
        width = top_path.stat().st_size // (8 * len(users))
        return users, targets, np.memmap(top_path, np.int64, "r", shape=(len(users), width))

    @classmethod
    def remove(cls, path: Path, rank: int) -> None:
        for what in ("top.bin", "users.npy", "targets.npy"):
            cls._name(path, rank, what).unlink(missing_ok=True)


class UserHistory:
    """Distinct items of each user in the splits before valid and test (train + older), as CSR.

    With the eval row's own items (everything before its target) this is the user's whole history:
    under leave_one_out, train = s[:-2] and the older rows hold every item the data job's
    max_seq_len cut from the train row, so nothing before a valid or test target is missed.
    Memory: 8 bytes per distinct (user, item) pair of those splits (a CSR of int64 items).
    """

    def __init__(self, user_offsets: np.ndarray, items: np.ndarray):
        self.user_offsets, self.items = user_offsets, items

    @classmethod
    def from_splits(cls, data_dir: Path, manifest: dict) -> UserHistory:
        """Read ``user_id`` and ``item_ids`` of the train and older splits (one pass, no Python loop over users)."""
        num_cols = int(manifest["num_items"]) + 1
        splits = manifest["splits"]
        keys = []
        num_full = 0  # train rows at the data job's length cap: their older items may have been cut
        cap = manifest.get("max_seq_len")
        for name in ("train", "older"):
            for entry in splits.get(name, {}).get("files", []):
                table = pq.read_table(data_dir / entry["path"], columns=["user_id", "item_ids"])
                items = table.column("item_ids").combine_chunks()
                lengths = items.value_lengths().to_numpy(zero_copy_only=False)
                users = np.repeat(table.column("user_id").to_numpy().astype(np.int64), lengths)
                values = items.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
                keys.append(np.unique(users * num_cols + values))
                if name == "train" and cap is not None:
                    num_full += int((lengths >= int(cap) + 1).sum())
        if num_full and "older" not in splits:
            logger.warning(
                "eval.exclude=all_history: %d train rows of %s hold max_seq_len + 1 = %d items, so the data "
                "job may have cut older items, which are then not excluded; prepare with "
                "split.older_windows=true for the whole history", num_full, data_dir, int(cap) + 1,
            )  # fmt: skip
        key = np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.int64)
        users = key // num_cols
        max_user = max(int(manifest.get("num_users", 0)), int(users.max()) if len(users) else 0)
        # user_offsets[u]..user_offsets[u + 1] are user u's items; one extra entry for unseen users.
        user_offsets = np.searchsorted(users, np.arange(max_user + 2))
        return cls(user_offsets, key % num_cols)

    def exclusions(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of ``batch``: its items before the target, then the user's train and older items
        (jagged ``(values, offsets [B+1])``; repeats are fine, exclusion deduplicates)."""
        history, _ = split_last(batch)
        users = batch.user_ids.numpy()
        known = users < len(self.user_offsets) - 1  # a user beyond every stored one has no stored items
        users = np.where(known, users, 0)
        starts = self.user_offsets[users]
        lengths = np.where(known, self.user_offsets[users + 1] - starts, 0)
        offsets = np.zeros(len(users) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
        stored = (torch.from_numpy(self.items[idx]), torch.from_numpy(offsets))
        return jagged_concat((history.item_ids, history.offsets), stored)


def evaluate_popularity(
    data_dir: str | os.PathLike,
    split: str = "test",
    batch_size: int = 4096,
    ks_hr: Sequence[int] = (1, 10, 50, 200),
    ks_ndcg: Sequence[int] = (10, 50, 200),
    history: UserHistory | None = None,
) -> dict[str, float]:
    """Popularity baseline on ``split`` of a prepared data directory, item counts from its train split.

    Excluded per user: the eval row's items before the target, or with ``history``
    (``eval.exclude=all_history``) also the user's train and older items. Memory O(items + batch):
    the counts are sorted once, every batch is ranked by binary search.
    """
    num_items = int(load_manifest(data_dir)["num_items"])
    counts = torch.zeros(num_items + 1, dtype=torch.long)
    for batch in SequenceDataset(data_dir, "train", batch_size, shuffle=False):
        counts += item_counts(batch.item_ids, num_items)
    counts = counts.to(torch.float64)
    sorted_counts = counts[1:].sort().values
    metrics = RetrievalMetrics(ks_hr, ks_ndcg)
    for batch in SequenceDataset(data_dir, split, batch_size, shuffle=False):
        rows, targets = split_last(batch)
        excl_values, excl_offsets = (
            history.exclusions(batch) if history is not None else (rows.item_ids, rows.offsets)
        )
        metrics.update(
            popularity_ranks(counts, targets, excl_values, excl_offsets, sorted_counts=sorted_counts)
        )
    return metrics.compute(all_reduce=False)
