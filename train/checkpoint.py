"""Checkpoints: sparse shards through ``torch.distributed.checkpoint``, dense state through DeepSpeed.

Layout of one checkpoint::

    checkpoints/step_00001234/
        meta.json               model shape, world size, ... (checked on load)
        sparse/                 DCP: every embedding table's shards + optimizer state, by table name
                                (reshardable); absent for a task without tables
        dense/dense/            DeepSpeed engine: encoder, optimizer, LR scheduler (ZeRO partitions)
        trainer_rank{r}.pt      loop state: step, epoch, reader position, best metric, history

Atomicity: everything is written into ``.tmp_step_00001234/``; after a barrier, rank 0 renames it to
``step_00001234/`` (one ``os.replace``). A crash mid-save leaves only a ``.tmp_*`` directory, which is
ignored and removed by the next save; ``latest()`` only sees complete checkpoints.

Resuming on another world size: the sparse table and its optimizer state are resharded by DCP; the
dense weights are loaded, and the dense optimizer state (partitioned by ZeRO for the old world size)
is started fresh, with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from train.embeddings import ShardedItemTable

logger = logging.getLogger(__name__)

_PREFIX = "step_"


def _sparse_state(tables: dict[str, ShardedItemTable]) -> dict:
    """One DCP state for all tables: ``{name: {"model": ..., "optim": ...}}``."""
    return {
        name: {"model": t.module.state_dict(), "optim": t.optimizer.state_dict()}
        for name, t in tables.items()
    }


def load_trainer_state(path: Path) -> dict:
    """A ``trainer_rank{r}.pt`` file: plain Python types and tensors only (``weights_only=True``).

    A checkpoint directory must not be able to run code when loaded: anything else in the file
    (a pickled object) is refused with a ValueError naming the file.
    """
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ValueError(
            f"{path} holds more than plain Python types and tensors, which the trainer refuses to unpickle "
            f"({str(exc).splitlines()[0]}). Was it written by this trainer? Start fresh with run.resume=never "
            "or point run.resume at a checkpoint you trust."
        ) from None


class CheckpointManager:
    """Saves, finds and loads checkpoints under ``root``, keeping the newest ``keep`` (plus the best)."""

    def __init__(self, root: Path, keep: int = 2):
        self.root = Path(root)
        self.keep = max(1, keep)

    def path_for(self, step: int) -> Path:
        return self.root / f"{_PREFIX}{step:08d}"

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(
            p for p in self.root.iterdir() if p.name.startswith(_PREFIX) and (p / "meta.json").is_file()
        )

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, tables: dict[str, ShardedItemTable], engine, trainer_state: dict, meta: dict,
             protect_step: int = -1) -> Path:  # fmt: skip
        """Collective: every rank calls it. ``tables``: the task's embedding tables by name (may be empty).

        Returns the final path.
        """
        rank = dist.get_rank()
        final, tmp = self.path_for(step), self.root / f".tmp_{_PREFIX}{step:08d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(f".tmp_{_PREFIX}*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        dist.barrier()
        if tables:
            dcp.save(_sparse_state(tables), checkpoint_id=str(tmp / "sparse"))
        # save_latest: DeepSpeed's ZeRO-3 module-only load (best checkpoint, other world size) ignores
        # the tag and reads dense/latest (deepspeed 0.19 engine._load_checkpoint).
        engine.save_checkpoint(str(tmp / "dense"), tag="dense", save_latest=True)
        torch.save(trainer_state, tmp / f"trainer_rank{rank}.pt")
        dist.barrier()
        if rank == 0:
            (tmp / "meta.json").write_text(json.dumps({**meta, "step": step}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune(protect_step)
        dist.barrier()
        logger.info("checkpoint saved: %s", final)
        return final

    def _prune(self, protect_step: int) -> None:
        done = self.complete()
        protected = {self.path_for(protect_step)} if protect_step >= 0 else set()
        for old in done[: -self.keep]:
            if old not in protected:
                shutil.rmtree(old, ignore_errors=True)

    def load(
        self,
        path: Path,
        tables: dict[str, ShardedItemTable],
        engine,
        meta: dict,
        dense_module_only: bool = False,
    ) -> dict:
        """Load into the live tables and engine; returns this rank's trainer state. Collective.

        ``meta`` is the task's ``checkpoint_meta()``; every key of it but ``world_size`` and
        ``zero_stage`` (which only change the layout) must match the saved one.
        """
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise ValueError(
                f"{path} is not a complete checkpoint (no meta.json); use run.resume=never or another path"
            )
        saved = json.loads(meta_path.read_text())
        if saved.get("num_items") != meta.get("num_items"):
            raise ValueError(
                f"checkpoint {path} was trained on a vocabulary of {saved.get('num_items')} items, but data.dir "
                f"holds {meta.get('num_items')}: it is another model's (or another data set's) checkpoint. Point "
                "data.dir at the data it was trained on, or start fresh (another run.output_dir, or run.resume=never)."
            )
        for key in meta:
            if key in ("num_items", "world_size", "zero_stage"):
                continue
            if saved.get(key) != meta.get(key):
                raise ValueError(
                    f"checkpoint {path} is of another model: {key}={saved.get(key)!r} there, {meta.get(key)!r} in "
                    "this config. Point run.output_dir at a fresh directory, or set run.resume=never."
                )
        for table in tables.values():
            if table.data_parallel:  # torch optimizers create their state lazily; DCP loads in place
                table.optimizer.init_state()
        if tables:
            state = _sparse_state(tables)
            dcp.load(state, checkpoint_id=str(path / "sparse"))
            for name, table in tables.items():
                table.module.load_state_dict(state[name]["model"])
                table.optimizer.load_state_dict(state[name]["optim"])
        same_layout = saved.get("world_size") == meta.get("world_size") and saved.get(
            "zero_stage"
        ) == meta.get("zero_stage")
        if not same_layout and not dense_module_only:
            logger.warning(
                "checkpoint %s was written with world size %s / ZeRO stage %s, this run has %s / %s: the sparse "
                "table is resharded; dense weights are loaded, dense optimizer state starts fresh",
                path, saved.get("world_size"), saved.get("zero_stage"), meta.get("world_size"), meta.get("zero_stage"),
            )  # fmt: skip
        module_only = dense_module_only or not same_layout
        engine.load_checkpoint(
            str(path / "dense"),
            tag="dense",
            load_module_only=module_only,
            load_optimizer_states=not module_only,
            load_lr_scheduler_states=not module_only,
        )
        rank_file = path / f"trainer_rank{dist.get_rank()}.pt"
        if not rank_file.is_file():
            rank_file = path / "trainer_rank0.pt"
        return load_trainer_state(rank_file)
