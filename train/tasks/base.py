"""The task interface: what a model family gives the trainer.

A *task* is a model family on the shared trainer (in the spirit of torchtitan's ``TrainSpec``). It
builds its parts, computes the loss of a batch and produces ranked item ids for evaluation; the
``Trainer`` (``train/trainer.py``) owns everything else: the loop, the DeepSpeed engine, the LR
schedule, checkpoints of the named parts, evaluation (``train/evaluation.py``), tracking.

The life of a task inside the trainer::

    task = build_task(cfg, info, manifest)                 # registry by model.name (train/tasks/__init__)
    tables = task.build_tables()                           # {name: sharded TorchRec table}, may be {}
    engine = DeepSpeed(task.build_dense())                 # one dense module per task
    per step:  n = task.count_targets(batch, ctx)          # all-reduced: the global loss denominator
               loss_sum = task.train_loss(batch, ctx)      # the trainer scales, backwards, steps
    eval:      prepared = task.prepare_eval(dense_replica) # e.g. gather a table (a collective)
               out = task.eval_batch(batch, prepared, top_k)  # ranks of the targets + top-k ids
    planning:  TaskClass.memory_model(cfg)                 # per-rank memory terms (cluster/memory.py)

Every collective a task makes (table lookups) must happen the same number of times on every rank;
the trainer calls each method on every rank with each rank's own batch.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cluster.memory import FamilyMemory
from train.batch import SequenceBatch
from train.config import TrainConfig
from train.distributed import DistInfo
from train.embeddings import ShardedItemTable, lookup


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad * ctx.scale, None


@dataclass
class StepContext:
    """What a training step of a task may use besides its batch.

    ``dense`` is the DeepSpeed engine (call it like the module: its hooks must see the forward).
    ``lookup`` scales a table lookup's gradient so that the table gets the same global mean gradient as
    the dense model (tests/test_embeddings.py checks it with SGD on every sharding type).
    """

    step: int  # micro-steps done before this one
    seed: int
    rank: int
    world_size: int
    device: torch.device
    dense: Any  # the DeepSpeed engine
    dense_dtype: torch.dtype
    grad_accum_steps: int
    loss_scale: float  # fp16's dynamic loss scale (1.0 otherwise): sparse grads are divided by it

    def lookup(self, table: ShardedItemTable, ids: Tensor) -> Tensor:
        """Embeddings of ``ids`` through the sharded ``table``, gradient-scaled for the global mean."""
        # DDP and TorchRec's all-to-all average the ranks' gradients (see ShardedItemTable.grad_sum_over_ranks).
        scale = self.grad_accum_steps / (self.world_size if table.grad_sum_over_ranks else 1)
        return _ScaleGrad.apply(lookup(table, ids, self.device), scale / self.loss_scale)


@dataclass
class EvalOutput:
    """One evaluated batch: per kept row, the target's 0-based rank and (if asked) the top-k ids."""

    rows: Tensor  # [B] bool over the batch's rows: the rows evaluated (e.g. those with a history)
    targets: Tensor  # [R] dense target item ids of the evaluated rows
    ranks: Tensor  # [R] 0-based rank of each target (metrics.NOT_FOUND_RANK when not ranked)
    top_ids: Tensor | None  # [R, k] dense item ids in rank order (0 past the end), when asked

    @classmethod
    def empty(cls, rows: Tensor, top_k: int | None) -> EvalOutput:
        """A batch with no row to evaluate."""
        none = torch.zeros(0, dtype=torch.long)
        return cls(rows, none, none, None if top_k is None else none.view(0, 1))


class Task(abc.ABC):
    """A model family: builds its parts, computes the training loss, ranks items for evaluation."""

    # True when train/serving.py can load the family as an MLflow logged model (every item's
    # embedding, ``full_item_table``, scored by the dense module's last query); tracking.log_model
    # skips the others.
    servable = False

    def full_item_table(self, device: torch.device, dst: int | None = None) -> Tensor | None:
        """Every item's input embedding, row d = item d (a collective; with ``dst`` only that rank gets
        it, the others None). Servable tasks implement it."""
        raise NotImplementedError(f"{type(self).__name__} is not servable")

    def __init__(self, cfg: TrainConfig, info: DistInfo, manifest: dict):
        self.cfg, self.info, self.manifest = cfg, info, manifest
        self.device = info.device
        self.num_items = int(manifest["num_items"])

    # ------------------------------------------------------------------------------- building

    @property
    @abc.abstractmethod
    def max_seq_len(self) -> int:
        """Rows are cut to their most recent ``max_seq_len + 1`` items (inputs + the last target)."""

    @abc.abstractmethod
    def build_tables(self) -> dict[str, ShardedItemTable]:
        """Plan, shard and initialise the task's TorchRec tables (a collective); ``{}`` for none."""

    @abc.abstractmethod
    def build_dense(self) -> nn.Module:
        """A fresh dense module (the trainer seeds torch first; also used for eval replicas)."""

    # ------------------------------------------------------------------------------- training

    @abc.abstractmethod
    def count_targets(self, batch: SequenceBatch | None, ctx: StepContext) -> int:
        """How many loss terms this rank's batch has (the trainer sums them over ranks)."""

    @abc.abstractmethod
    def train_loss(self, batch: SequenceBatch, ctx: StepContext) -> tuple[Tensor, int]:
        """``(sum of this rank's loss terms, their number)``; the trainer turns it into the global mean."""

    # ----------------------------------------------------------------------------- evaluation

    @abc.abstractmethod
    def prepare_eval(self, dense: nn.Module) -> Any:
        """Once per evaluation, on every rank (may be a collective): what ``eval_batch`` needs."""

    @abc.abstractmethod
    def eval_batch(
        self,
        batch: SequenceBatch | None,
        prepared: Any,
        top_k: int | None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> EvalOutput | None:
        """Rank every eligible item for each row's last item (the target), history excluded.

        ``exclude``: the items to exclude per row of the batch, jagged ``(values, offsets [B+1])``
        (``eval.exclude=all_history``, built by the evaluator); None: the task's own history (its
        input). ``batch`` is None only for a task that evaluates in lockstep (``eval_in_lockstep``),
        on a rank that has run out of batches while others have not: it must still make the same
        collectives, and returns None.
        """

    def eval_in_lockstep(self) -> bool:
        """True when ``eval_batch`` is a collective: every rank then calls it the same number of times."""
        return False

    def eval_counters(self, prepared: Any) -> dict[str, tuple[float, float]]:
        """Extra eval metrics of this rank as ``{name: (numerator, denominator)}``, summed over ranks
        by the evaluator (e.g. TIGER's invalid-ID rate); called after the last ``eval_batch``."""
        return {}

    # ---------------------------------------------------------------------------- description

    @abc.abstractmethod
    def checkpoint_meta(self) -> dict:
        """What a checkpoint must agree on to be loaded into this task (its shape, catalogue size)."""

    def describe(self) -> dict:
        """Facts a reported number depends on (e.g. the loss), for final_metrics.json."""
        return {}

    def log_summary(self) -> str:
        """One short phrase for the start-of-run log line (e.g. ``loss=shared(512)``)."""
        return ""

    def warn_about_data(self) -> None:  # noqa: B027 (optional hook)
        """Log what the data lacks for this family (e.g. no timestamps)."""

    # --------------------------------------------------------------------------------- memory

    @classmethod
    def memory_model(cls, cfg: TrainConfig) -> FamilyMemory:
        """The family's per-rank memory terms (``cluster.memory.FamilyMemory``) for ``cfg``, used by
        ``cluster/memory.py``'s ``estimate_memory`` and the planner (``python -m cluster plan``,
        ``schedule.mode=auto``). A class method: planning happens before any data or table exists."""
        raise ValueError(
            f"model.name={cfg.model.name}: this family has no memory model (Task.memory_model); "
            "plan its batch and ZeRO stage by hand"
        )
