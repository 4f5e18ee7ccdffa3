"""The sparse side: the item embedding table as a TorchRec ``EmbeddingCollection``.

Built on the meta device, given its optimizer with ``apply_optimizer_in_backward``, planned by
``EmbeddingShardingPlanner`` under constraints generated from the config, and sharded by
``DistributedModelParallel``. Only the table lives in DMP: the dense encoder is a DeepSpeed engine
(``train/zero.py``), so dense-model gradients are reduced once, by DeepSpeed.

Two kinds of sharding:

- model parallel (row_wise, table_wise, column_wise): each rank holds a part of the table; the
  ``fused`` kernels (fbgemm) apply the optimizer inside the backward pass, and TorchRec's all-to-all
  backward *averages* the gradients arriving from all ranks (its default gradient division; table_row_wise
  exists for pooled tables only, not for this one);
- data_parallel: every rank holds the whole table (``dense`` kernel). TorchRec wraps its lookup in
  DDP, which *averages* the table's gradients over ranks in backward; the optimizer is a plain torch
  optimizer stepped after backward (``ShardedItemTable.step``), so Adam works on CPU too, and, as in
  the HSTU reference, it updates every row (its moments decay even for rows absent from the batch).

Each table is its own ``EmbeddingCollection`` with one feature, planned and sharded on its own
(the retrieval task has one, ``item_table`` with feature ``item_ids``; TIGER has a token table). The
retrieval task looks up each id of a step once (the unique ids of inputs, targets and negatives together) and indexes the result
locally: with sampled negatives most lookups are repeats, and deduplicating them shrinks the
embedding all-to-all and the fused backward by an order of magnitude.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported here, before any process group exists, on purpose. ``torch.distributed.optim`` binds
# ``dist.group.WORLD`` as a default argument when first imported, and TorchRec's
# ``apply_optimizer_in_backward`` imports it lazily, i.e. after ``init_process_group``. The default
# group would then outlive ``destroy_process_group``: on gloo its worker threads stay alive into
# interpreter shutdown, and one that releases a just-finished collective's tensors there aborts the
# process ("terminate called without an active exception"). Imported first, the default is None.
import torch.distributed.optim  # noqa: F401
from torch import Tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel, comm_ops
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import KeyedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cluster.config import ConfigError
from train.config import EmbeddingTableConfig

logger = logging.getLogger(__name__)

TABLE = "item_table"
FEATURES = ["item_ids"]
_INIT_CHUNK_ROWS = 8192


@dataclass
class ShardedItemTable:
    """A DMP-wrapped embedding table plus what the trainer needs to know about it."""

    module: DistributedModelParallel
    plan: ShardingPlan
    num_embeddings: int
    embedding_dim: int  # what the model sees
    table_dim: int  # stored width: fbgemm needs a multiple of 4 (e.g. the paper's 50 is stored as 52)
    # The LR the table's next update uses. Kept here, not read back from the optimizer: under
    # table_wise sharding a rank that holds no shard has an optimizer with no param groups.
    lr: float
    # data_parallel only: the optimizer stepped after backward (model-parallel tables are fused).
    replicated_optimizer: KeyedOptimizerWrapper | None = None
    name: str = TABLE  # the TorchRec table name
    feature: str = FEATURES[0]  # its one feature

    @property
    def weight_key(self) -> str:
        """The key of the weight in ``module.state_dict()``."""
        return f"embeddings.{self.name}.weight"

    @property
    def data_parallel(self) -> bool:
        return self.replicated_optimizer is not None

    @property
    def optimizer(self) -> KeyedOptimizer:
        """The table's optimizer, keyed by parameter name (for checkpoints)."""
        return self.replicated_optimizer or self.module.fused_optimizer

    @property
    def grad_sum_over_ranks(self) -> bool:
        """True when the table's gradient is the sum of the ranks' gradients, False when it is their mean.

        DDP averages a data_parallel table's gradients. A model-parallel table's gradients come back
        through TorchRec's all-to-all, whose backward also divides by the world size while
        ``torchrec.distributed.comm_ops`` has gradient division on (its default), so it averages too.
        """
        return not self.data_parallel and not comm_ops.get_gradient_division()

    def step(self) -> None:
        """After backward: step a data_parallel table's optimizer (fused tables already stepped)."""
        if self.replicated_optimizer is not None:
            self.replicated_optimizer.step()
            self.replicated_optimizer.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        """Set the table's learning rate for the next update (the trainer's schedule calls this)."""
        self.lr = lr
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if not self.data_parallel:
            # A fused optimizer updates rows inside backward; its step() only hands param_groups' lr
            # to the fbgemm kernels (TorchRec's EmbeddingFusedOptimizer.step).
            self.module.fused_optimizer.step()

    def plan_text(self) -> str:
        return str(self.plan)


def _optimizer(cfg: EmbeddingTableConfig, device: torch.device) -> tuple[type, dict]:
    if cfg.optimizer == "adam" and device.type != "cuda" and cfg.sharding_type != "data_parallel":
        raise ConfigError(
            "embeddings.optimizer",
            "fbgemm's fused Adam runs on CUDA only; on CPU use rowwise_adagrad, adagrad or sgd, or "
            "embeddings.sharding_type=data_parallel (a replicated table with a plain torch Adam)",
        )
    if cfg.optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    return torch.optim.Adam, {
        "lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps, "weight_decay": cfg.weight_decay
    }  # fmt: skip


def build_item_table(
    cfg: EmbeddingTableConfig, num_items: int, embedding_dim: int, device: torch.device, seed: int
) -> ShardedItemTable:
    """Plan, shard and initialise the item table (``num_items + 1`` rows: row 0 is padding)."""
    return build_table(cfg, num_items + 1, embedding_dim, device, seed)


def build_table(
    cfg: EmbeddingTableConfig,
    num_embeddings: int,
    embedding_dim: int,
    device: torch.device,
    seed: int,
    name: str = TABLE,
    feature: str = FEATURES[0],
) -> ShardedItemTable:
    """Plan, shard and initialise one table of ``num_embeddings`` rows under ``cfg`` (a collective)."""
    sharder = EmbeddingCollectionSharder()
    offered = sharder.sharding_types(device.type)
    if cfg.sharding_type not in offered:
        # table_row_wise, which TorchRec offers for pooled EmbeddingBagCollections only.
        raise ConfigError(
            "embeddings.sharding_type",
            f"{cfg.sharding_type} is not offered by TorchRec for the {name} table (an EmbeddingCollection of "
            f"sequence embeddings); use one of {', '.join(offered)}",
        )
    table_dim = -(-embedding_dim // 4) * 4
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=name, embedding_dim=table_dim, num_embeddings=num_embeddings, feature_names=[feature]
            )
        ],
        device=torch.device("meta"),
    )
    opt_cls, opt_kwargs = _optimizer(cfg, device)
    data_parallel = cfg.sharding_type == "data_parallel"
    if not data_parallel:
        apply_optimizer_in_backward(opt_cls, ec.parameters(), opt_kwargs)
    kernel = cfg.compute_kernel
    if kernel == "auto":
        kernel = "dense" if data_parallel else "fused"

    world_size = dist.get_world_size()
    topology_kwargs = {"world_size": world_size, "compute_device": device.type}
    if cfg.memory_cap_gib is not None:
        cap = int(cfg.memory_cap_gib * 1024**3)
        topology_kwargs["hbm_cap" if device.type == "cuda" else "ddr_cap"] = cap
    constraint = ParameterConstraints(sharding_types=[cfg.sharding_type], compute_kernels=[kernel])
    if cfg.min_partition is not None:
        constraint.min_partition = cfg.min_partition
    planner = EmbeddingShardingPlanner(topology=Topology(**topology_kwargs), constraints={name: constraint})
    pg = dist.GroupMember.WORLD
    try:
        plan = planner.collective_plan(ec, [sharder], pg)
    except RuntimeError as exc:
        raise ConfigError(
            "embeddings.sharding_type",
            f"TorchRec found no plan for {cfg.sharding_type}/{kernel} on {device.type} "
            f"({num_embeddings} x {embedding_dim}, world size {world_size}): {exc}",
        ) from None
    module = DistributedModelParallel(
        ec, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=[sharder], device=device
    )
    replicated_optimizer = None
    if data_parallel:
        params = dict(module.named_parameters())
        replicated_optimizer = KeyedOptimizerWrapper(params, lambda ps: opt_cls(ps, **opt_kwargs))
    table = ShardedItemTable(
        module, plan, num_embeddings, embedding_dim, table_dim, cfg.lr, replicated_optimizer, name, feature
    )
    init_table_(table, cfg.init_std, seed)
    return table


@torch.no_grad()
def init_table_(table: ShardedItemTable, std: float, seed: int) -> None:
    """Fill every local shard with N(0, std) values that depend only on (seed, global row, column).

    TorchRec initialises each shard on its own, so the same seed would give different tables for
    different world sizes or sharding types. Generating fixed row chunks from the seed makes the
    initial table independent of the plan, which is what lets tests compare sharded with unsharded.
    """
    weight = table.module.state_dict()[table.weight_key]
    dim = table.table_dim
    if isinstance(weight, ShardedTensor):
        shards = [(s.tensor, s.metadata.shard_offsets, s.metadata.shard_sizes) for s in weight.local_shards()]
    else:  # data_parallel: the whole table on every rank
        shards = [(weight, (0, 0), tuple(weight.shape))]
    for tensor, (row0, col0), (num_rows, num_cols) in shards:
        first_chunk, last_chunk = row0 // _INIT_CHUNK_ROWS, (row0 + num_rows - 1) // _INIT_CHUNK_ROWS
        for chunk in range(first_chunk, last_chunk + 1):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            chunk_start = chunk * _INIT_CHUNK_ROWS
            rows = min(_INIT_CHUNK_ROWS, table.num_embeddings - chunk_start)
            values = torch.randn(rows, dim, generator=gen) * std
            lo, hi = max(row0, chunk_start), min(row0 + num_rows, chunk_start + rows)
            tensor[lo - row0 : hi - row0].copy_(
                values[lo - chunk_start : hi - chunk_start, col0 : col0 + num_cols]
            )


def lookup(table: ShardedItemTable, ids: Tensor, device: torch.device) -> Tensor:
    """Embeddings ``[len(ids), embedding_dim]`` of ``ids`` through the sharded table.

    The stored padding columns are cut off, so they get no gradient. This is a collective: every
    rank must call it the same number of times (each with its own ids).
    """
    # One sequence of all ids; for data_parallel one sequence per id, because TorchRec's dense kernel
    # for an EmbeddingCollection returns one row per sequence on CPU (a sum) instead of one per id.
    if table.data_parallel:
        if len(ids) == 0:  # the dense kernel cannot look up nothing; a replicated lookup is no collective
            return torch.zeros(0, table.embedding_dim, device=device)
        lengths = torch.ones(len(ids), dtype=torch.long)
    else:
        lengths = torch.tensor([len(ids)])
    kjt = KeyedJaggedTensor(keys=[table.feature], values=ids, lengths=lengths).to(device)
    return table.module(kjt)[table.feature].values()[:, : table.embedding_dim]


@torch.no_grad()
def local_item_rows(
    table: ShardedItemTable, device: torch.device, chunk_rows: int = 65536
) -> tuple[int, Tensor]:
    """``(first_id, rows [S, D])``: a contiguous range of whole table rows for this rank, the ranges of
    the ranks partitioning the table in rank order (a collective). Nothing is gathered.

    row_wise: the rank's own TorchRec shard, read in place (no communication). Other types hold no
    such range (table_wise: one rank has everything; column_wise: every rank has some columns of
    every row), so each rank looks up an equal slice of the ids through the sharded module; that
    moves O(rows / world) per rank once per evaluation and splits the scoring work evenly.
    """
    weight = table.module.state_dict()[table.weight_key]
    if is_row_wise(table):  # the same answer on every rank: the plan is shared
        shards = weight.local_shards() if isinstance(weight, ShardedTensor) else []
        if not shards:  # a rank without rows (a table smaller than the world): an empty range
            return table.num_embeddings, torch.zeros(0, table.embedding_dim, device=device)
        (shard,) = shards
        return shard.metadata.shard_offsets[0], shard.tensor[:, : table.embedding_dim].to(device)
    world, rank = dist.get_world_size(), dist.get_rank()
    per_rank = -(-table.num_embeddings // world)
    start = min(rank * per_rank, table.num_embeddings)
    stop = min(start + per_rank, table.num_embeddings)
    if table.data_parallel:  # every rank holds the whole table: take this rank's slice of it
        return start, weight[start:stop, : table.embedding_dim].to(device)
    # Every rank makes the same number of lookups (a collective), some of them maybe empty.
    parts = [
        lookup(table, torch.arange(start + c, min(start + c + chunk_rows, stop), dtype=torch.long), device)
        for c in range(0, per_rank, chunk_rows)
    ]
    return start, torch.cat(parts)[: stop - start]


def is_row_wise(table: ShardedItemTable) -> bool:
    """True when the plan shards the table row-wise (each rank one contiguous range of whole rows)."""
    for module_plan in table.plan.plan.values():
        spec = module_plan.get(table.name) if hasattr(module_plan, "get") else None
        if spec is not None:
            return spec.sharding_type == "row_wise"
    return False


@torch.no_grad()
def gather_full_table(
    table: ShardedItemTable, device: torch.device, chunk_rows: int = 65536, dst: int | None = None
) -> Tensor | None:
    """The whole table ``[num_embeddings, D]`` on every rank (for retrieval over all items), or with
    ``dst`` on that rank only (None elsewhere: the other ranks never hold more than their slice).

    Each rank looks up an equal slice of the ids through the sharded module (works for every sharding
    type), then the slices are all-gathered (or gathered to ``dst``).
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if table.data_parallel:  # every rank already holds it
        if dst is not None and rank != dst:
            return None
        weight = table.module.state_dict()[table.weight_key]
        return weight[:, : table.embedding_dim].detach().clone().to(device)
    world = dist.get_world_size()
    per_rank = -(-table.num_embeddings // world)
    start = rank * per_rank
    ids = torch.arange(start, min(start + per_rank, table.num_embeddings), dtype=torch.long)
    num_chunks = max(1, -(-per_rank // chunk_rows))
    parts = []
    for c in range(num_chunks):
        chunk = ids[c * chunk_rows : (c + 1) * chunk_rows]
        parts.append(lookup(table, chunk, device))
    local = torch.cat(parts) if parts else torch.empty(0, table.embedding_dim, device=device)
    padded = torch.zeros(per_rank, table.embedding_dim, device=device, dtype=local.dtype)
    padded[: len(local)] = local
    del parts, local
    if dst is not None and rank != dst:
        dist.gather(padded, None, dst=dst)
        return None
    # Straight into one tensor: the whole table once, not once per slice and again concatenated.
    out = torch.empty(world * per_rank, table.embedding_dim, device=device, dtype=padded.dtype)
    if dst is None:
        dist.all_gather_into_tensor(out, padded)
    else:
        dist.gather(padded, list(out.view(world, per_rank, -1).unbind(0)), dst=dst)
    return out[: table.num_embeddings]
