"""The trainer's configuration: one typed tree, loaded from ``configs/*.yaml`` plus overrides.

    cfg = load_train_config("configs/hstu_ml1m.yaml", ["optim.lr=3e-4", "zero.stage=2"])

The DeepSpeed JSON (``train/zero.py``) and the TorchRec planner constraints (``train/embeddings.py``)
are generated from this tree; nothing is kept by hand in parallel.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.config import ConfigError, load_config
from train.models.config import ModelConfig
from train.tracking import TrackingConfig


@dataclass
class DataConfig:
    """Where the prepared shards are (the output of ``python -m data_pipeline prepare``)."""

    dir: str = "runs/demo/data"
    batch_size: int = 128  # rows per step, global across ranks (each rank takes batch_size / world_size)
    eval_batch_size: int = 256  # rows per eval step, global
    num_workers: int = 0  # DataLoader worker processes per rank
    shuffle: bool = True
    # How rows are dealt to ranks (see train/reader.py): rows = contiguous balanced ranges (reads
    # ~1/world of the data per rank); strided = row i of each global batch goes to rank i % world, so
    # global batches are the same whatever the world size (every rank reads all row groups);
    # row_groups = whole row groups per rank (unbalanced; only for many row groups).
    partition: Literal["rows", "strided", "row_groups"] = "rows"
    # Which split's rows train the model. train (default): every item but the last two of each user;
    # valid is held out for early stopping and best-checkpoint selection. train_valid: train on the
    # valid rows (every item but the test target), the protocol of the HSTU and SASRec reference
    # code; nothing is held out for selection, so the last checkpoint is tested, early stopping is
    # refused, and the periodic evaluations (on test) are a curve only, never used for a decision.
    train_split: Literal["train", "train_valid"] = "train"
    # Also train on the "older" split: the history that the data job's max_seq_len cut from each
    # user's rows, as windows (prepare with split.older_windows=true). Rows otherwise keep only the
    # most recent max_seq_len + 1 items; on ML-1M at 200 that leaves out a third of the interactions.
    older_windows: bool = False
    # How training batches are cut (train/token_batching.py). rows: batch_size rows per step (global).
    # tokens: per rank at most max_tokens_per_rank items and max_attention_cost_per_rank (sum of
    # squared row lengths; None: no limit), length-bucketed and balanced across ranks, every rank the
    # same number of steps; batch_size and partition are then not used for training.
    batching: Literal["rows", "tokens"] = "rows"
    max_tokens_per_rank: int | None = None
    max_attention_cost_per_rank: int | None = None

    def validate(self) -> None:
        for key in ("batch_size", "eval_batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"data.{key}", f"got {getattr(self, key)}, expected an integer >= 1")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", f"got {self.num_workers}, expected >= 0")
        if self.batching == "tokens" and self.max_tokens_per_rank is None:
            raise ConfigError(
                "data.max_tokens_per_rank",
                "data.batching=tokens needs a per-rank token budget, e.g. data.max_tokens_per_rank=8192 "
                "(python -m cluster plan computes one that fits the GPU)",
            )
        for key in ("max_tokens_per_rank", "max_attention_cost_per_rank"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"data.{key}", f"got {value}, expected an integer >= 1 or null")


@dataclass
class EmbeddingTableConfig:
    """The item embedding table: a TorchRec ``EmbeddingCollection`` sharded by ``DistributedModelParallel``."""

    # Model parallel (row_wise, table_wise, column_wise, table_row_wise): each rank holds a part,
    # the optimizer is fused in backward. data_parallel: every rank holds the whole table, TorchRec's
    # DDP averages its gradients, and a torch optimizer steps it after backward (train/embeddings.py).
    sharding_type: Literal["row_wise", "table_wise", "column_wise", "table_row_wise", "data_parallel"] = (
        "row_wise"
    )
    # auto: fused for model-parallel sharding, dense for data_parallel (the only kernel TorchRec has for it).
    compute_kernel: Literal["auto", "fused", "fused_uvm", "fused_uvm_caching", "dense"] = "auto"
    # fbgemm's fused CPU kernels support rowwise_adagrad, adagrad and sgd; fused adam is CUDA only.
    # data_parallel tables take any of the four on any device (adam: the reference's table optimizer).
    # Under column_wise sharding, rowwise_adagrad keeps one accumulator per row and column shard, so
    # it differs slightly from the unsharded optimizer (adagrad and sgd do not).
    optimizer: Literal["rowwise_adagrad", "adagrad", "sgd", "adam"] = "rowwise_adagrad"
    lr: float = 0.05
    # dense: the table's LR follows optim's warmup and decay (embeddings.lr times the same factor);
    # constant: embeddings.lr throughout.
    schedule: Literal["dense", "constant"] = "dense"
    eps: float = 1e-8
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adam only
    weight_decay: float = 0.0
    init_std: float = 0.02
    # Planner topology: memory per device in GiB (None: ask the device; CPU uses the host's memory).
    memory_cap_gib: float | None = None
    # Column-wise shards are at least this wide (None: the planner's default).
    min_partition: int | None = None

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("embeddings.lr", f"got {self.lr}, expected > 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("embeddings.betas", f"got {self.betas}, expected two numbers in [0, 1)")
        data_parallel = self.sharding_type == "data_parallel"
        if self.compute_kernel != "auto" and data_parallel != (self.compute_kernel == "dense"):
            raise ConfigError(
                "embeddings.compute_kernel",
                f"got {self.compute_kernel} with sharding_type={self.sharding_type}: data_parallel takes the "
                "dense kernel, model-parallel sharding a fused one; auto picks the right one",
            )


@dataclass
class LossConfig:
    """The retrieval loss over L2-normalised embeddings: a softmax, or SASRec's binary cross-entropy."""

    # softmax: cross-entropy of the target against the negatives below (one softmax per position);
    # binary: the SASRec paper's loss, -log sigmoid(s_target) - sum_k log(1 - sigmoid(s_negative_k)),
    # on the same logits (cosine / temperature); needs sampled negatives (per_position or shared;
    # the paper: per_position with num_negatives 1).
    function: Literal["softmax", "binary"] = "softmax"
    # per_position: num_negatives fresh uniform negatives for every position (the HSTU reference);
    # shared: num_negatives uniform negatives shared by the whole global batch (much faster);
    # in_batch: the other positions' targets are the negatives;
    # full: every item is a negative (the exact softmax; num_negatives is ignored). Each step looks up
    # the whole table and builds [positions, items] logits, so keep it to catalogs of ~100K items.
    negatives: Literal["per_position", "shared", "in_batch", "full"] = "shared"
    num_negatives: int = 512
    temperature: float = 0.05

    def is_sampled(self) -> bool:
        """Whether negatives are drawn (and ``num_negatives`` counts them)."""
        return self.negatives in ("per_position", "shared")

    def describe(self) -> str:
        """``full``, ``in_batch``, ``per_position(128)``, ``shared(2048)``, or with the binary loss
        ``binary per_position(1)``: what a reported number used."""
        negatives = f"{self.negatives}({self.num_negatives})" if self.is_sampled() else self.negatives
        return negatives if self.function == "softmax" else f"{self.function} {negatives}"

    def validate(self) -> None:
        if self.function == "binary" and not self.is_sampled():
            raise ConfigError(
                "loss.function",
                f"binary needs sampled negatives, got loss.negatives={self.negatives}; set loss.negatives="
                "per_position (SASRec: loss.num_negatives=1) or shared, or loss.function=softmax",
            )
        if self.num_negatives < 1 and self.is_sampled():
            raise ConfigError("loss.num_negatives", f"got {self.num_negatives}, expected >= 1")
        if self.temperature <= 0:
            raise ConfigError("loss.temperature", f"got {self.temperature}, expected > 0")


@dataclass
class OptimConfig:
    """Dense optimizer (AdamW inside DeepSpeed) and its schedule."""

    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    # Share of the post-warmup steps the decay takes, at the end: 1.0 decays from the end of warmup;
    # 0.2 holds the peak LR for 80% of the steps, then decays (warmup-stable-decay).
    decay_fraction: float = 1.0
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # 0 disables clipping
    grad_accum_steps: int = 1  # dense only: sparse tables are updated in every backward

    def validate(self) -> None:
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError("optim.betas", f"got {self.betas}, expected two numbers in [0, 1)")
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"got {self.lr}, expected > 0")
        if self.warmup_steps < 0:
            raise ConfigError("optim.warmup_steps", f"got {self.warmup_steps}, expected >= 0")
        if not 0 < self.decay_fraction <= 1:
            raise ConfigError("optim.decay_fraction", f"got {self.decay_fraction}, expected in (0, 1]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", f"got {self.min_lr_ratio}, expected in [0, 1]")
        if self.grad_accum_steps < 1:
            raise ConfigError("optim.grad_accum_steps", f"got {self.grad_accum_steps}, expected >= 1")


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO for the dense model."""

    stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False  # stage 3 only
    # auto: bf16 on CUDA devices that support it, fp32 elsewhere.
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    def validate(self) -> None:
        if self.stage not in (0, 1, 2, 3):
            raise ConfigError("zero.stage", f"got {self.stage}, allowed values: 0, 1, 2, 3")
        if self.offload_params and self.stage != 3:
            raise ConfigError("zero.offload_params", "parameter offload needs zero.stage=3")
        if self.offload_optimizer and self.stage == 0:
            raise ConfigError("zero.offload_optimizer", "optimizer offload needs zero.stage >= 1")


@dataclass
class EvalConfig:
    """Retrieval over all items, the user's history excluded."""

    every_epochs: int = 1
    metric: str = "ndcg@10"  # early stopping and best checkpoint
    patience: int = 0  # evaluations without improvement before stopping; 0 disables early stopping
    top_k: int = 200  # items written per user to test_predictions.parquet
    # Cut-offs of the reported metrics: hr@k (= Recall@k with one target) and ndcg@k.
    hr_at: list[int] = field(default_factory=lambda: [1, 10, 50, 200])
    ndcg_at: list[int] = field(default_factory=lambda: [10, 50, 200])
    # Items never recommended (and never counted above the target; the target itself always counts):
    #   all_history   every item the user interacted with before the target: the eval row, the train
    #                 row and the "older" rows that the data job's max_seq_len cut (what a user of the
    #                 recommendations expects: nothing they already have). Complete when the data was
    #                 prepared with split.older_windows=true; otherwise a warning counts the rows cut.
    #   input_window  only the model's input (the last model.max_seq_len items), as the HSTU reference
    #                 and the published ML-1M numbers do: set it to compare with those numbers.
    exclude: Literal["all_history", "input_window"] = "all_history"
    # How items are ranked over the catalogue (both exact and identical, train/scoring.py):
    #   sharded   each rank scores every rank's users against its own part of the item table, and the
    #             per-rank counts and top-k lists are merged: O(items / world) memory per rank;
    #   gathered  the whole table is gathered on every rank first: O(items) per rank (the old path,
    #             kept for benchmarks/scale_bench.py).
    scoring: Literal["sharded", "gathered"] = "sharded"

    def validate(self) -> None:
        for key in ("hr_at", "ndcg_at"):
            values = getattr(self, key)
            if not values or any(k < 1 for k in values):
                raise ConfigError(f"eval.{key}", f"got {values}, expected a non-empty list of integers >= 1")
        names = ["mrr", *(f"hr@{k}" for k in self.hr_at), *(f"ndcg@{k}" for k in self.ndcg_at)]
        if self.metric not in names:
            raise ConfigError(
                "eval.metric", f"got {self.metric!r}; the metrics computed are {', '.join(names)}"
            )


@dataclass
class RunConfig:
    """The loop: how long, where outputs go, how often to log and checkpoint."""

    output_dir: str = "runs/demo/train"
    epochs: int = 10
    max_steps: int = (
        0  # stop after this many batches (micro-steps) in total (0: no limit); a later run resumes
    )
    seed: int = 42
    log_every_steps: int = 20
    checkpoint_every_steps: int = 0  # 0: at the end of every epoch only
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto (latest in output_dir if any), never, or a checkpoint directory
    progress_bar: Literal["auto", "on", "off"] = "auto"

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("run.epochs", f"got {self.epochs}, expected >= 1")


@dataclass
class ScheduleConfig:
    """How the memory schedule is chosen: by hand (the other sections) or planned (``cluster/plan.py``)."""

    # auto: before building, the planner picks the sharding type and memory cap, ZeRO stage and
    # offload, activation checkpointing, gradient accumulation and a per-rank token budget that fit
    # gpu_memory_gib (python -m cluster plan shows the same plan); they override the config's values,
    # are written to <output_dir>/plan.json and logged to MLflow.
    mode: Literal["manual", "auto"] = "manual"
    gpu_memory_gib: float | None = None  # memory per GPU for mode=auto (None: ask the CUDA device)
    # Recompute each HSTU layer / SASRec or BERT4Rec block in backward instead of keeping its
    # activations (GRU4Rec and TIGER have no blocks to wrap: the trainer refuses it).
    activation_checkpointing: bool = False

    def validate(self) -> None:
        if self.gpu_memory_gib is not None and self.gpu_memory_gib <= 0:
            raise ConfigError("schedule.gpu_memory_gib", f"got {self.gpu_memory_gib}, expected > 0")


@dataclass
class TrainConfig:
    """Everything the trainer needs; see configs/*.yaml for annotated examples."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    embeddings: EmbeddingTableConfig = field(default_factory=EmbeddingTableConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def validate(self) -> None:
        if self.data.train_split == "train_valid" and self.eval.patience:
            raise ConfigError(
                "eval.patience",
                f"got {self.eval.patience} with data.train_split=train_valid: early stopping needs a "
                "held-out valid split; set eval.patience=0 or data.train_split=train",
            )


def load_train_config(path: str | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """YAML file (optional) + ``key.sub=value`` overrides -> validated ``TrainConfig``."""
    return load_config(TrainConfig, path, overrides)
