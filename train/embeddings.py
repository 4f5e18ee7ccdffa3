"""The sparse side: the item embedding table as a TorchRec ``EmbeddingCollection``.

Built on the meta device, given its optimizer (fused into the backward pass by fbgemm) with
``apply_optimizer_in_backward``, planned by ``EmbeddingShardingPlanner`` under constraints generated
from the config, and sharded by ``DistributedModelParallel``. Only the table lives in DMP: the dense
encoder is a DeepSpeed engine (``train/zero.py``), so dense gradients are reduced once, by DeepSpeed.

One table (``item_table``) with one feature, ``item_ids``. The trainer looks up each id of a
step once (the unique ids of inputs, targets and negatives together) and indexes the result
locally: with sampled negatives most lookups are repeats, and deduplicating them shrinks the
embedding all-to-all and the fused backward by an order of magnitude.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from cluster.config import ConfigError
from train.config import EmbeddingTableConfig

logger = logging.getLogger(__name__)

TABLE = "item_table"
FEATURES = ["item_ids"]
WEIGHT_KEY = f"embeddings.{TABLE}.weight"
_INIT_CHUNK_ROWS = 8192


@dataclass
class ShardedItemTable:
    """The DMP-wrapped table plus what the trainer needs to know about it."""

    module: DistributedModelParallel
    plan: ShardingPlan
    num_embeddings: int
    embedding_dim: int  # what the model sees
    table_dim: int  # stored width: fbgemm needs a multiple of 4 (e.g. the paper's 50 is stored as 52)

    def plan_text(self) -> str:
        return str(self.plan)


def _optimizer(cfg: EmbeddingTableConfig, device: torch.device) -> tuple[type, dict]:
    if cfg.optimizer == "adam" and device.type != "cuda":
        raise ConfigError(
            "embeddings.optimizer",
            "fbgemm's fused Adam runs on CUDA only; on CPU use rowwise_adagrad, adagrad or sgd",
        )
    if cfg.optimizer == "rowwise_adagrad":
        return RowWiseAdagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD, {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    return torch.optim.Adam, {"lr": cfg.lr, "eps": cfg.eps, "weight_decay": cfg.weight_decay}


def build_item_table(
    cfg: EmbeddingTableConfig, num_items: int, embedding_dim: int, device: torch.device, seed: int
) -> ShardedItemTable:
    """Plan, shard and initialise the item table (``num_items + 1`` rows: row 0 is padding)."""
    num_embeddings = num_items + 1
    table_dim = -(-embedding_dim // 4) * 4
    ec = EmbeddingCollection(
        tables=[
            EmbeddingConfig(
                name=TABLE, embedding_dim=table_dim, num_embeddings=num_embeddings, feature_names=FEATURES
            )
        ],
        device=torch.device("meta"),
    )
    opt_cls, opt_kwargs = _optimizer(cfg, device)
    apply_optimizer_in_backward(opt_cls, ec.parameters(), opt_kwargs)

    world_size = dist.get_world_size()
    topology_kwargs = {"world_size": world_size, "compute_device": device.type}
    if cfg.memory_cap_gib is not None:
        cap = int(cfg.memory_cap_gib * 1024**3)
        topology_kwargs["hbm_cap" if device.type == "cuda" else "ddr_cap"] = cap
    constraint = ParameterConstraints(
        sharding_types=[cfg.sharding_type], compute_kernels=[cfg.compute_kernel]
    )
    if cfg.min_partition is not None:
        constraint.min_partition = cfg.min_partition
    planner = EmbeddingShardingPlanner(topology=Topology(**topology_kwargs), constraints={TABLE: constraint})
    sharder = EmbeddingCollectionSharder()
    pg = dist.GroupMember.WORLD
    try:
        plan = planner.collective_plan(ec, [sharder], pg)
    except RuntimeError as exc:
        raise ConfigError(
            "embeddings.sharding_type",
            f"TorchRec found no plan for {cfg.sharding_type}/{cfg.compute_kernel} on {device.type} "
            f"({num_embeddings} x {embedding_dim}, world size {world_size}): {exc}",
        ) from None
    module = DistributedModelParallel(
        ec, env=ShardingEnv.from_process_group(pg), plan=plan, sharders=[sharder], device=device
    )
    table = ShardedItemTable(module, plan, num_embeddings, embedding_dim, table_dim)
    init_table_(table, cfg.init_std, seed)
    return table


@torch.no_grad()
def init_table_(table: ShardedItemTable, std: float, seed: int) -> None:
    """Fill every local shard with N(0, std) values that depend only on (seed, global row, column).

    TorchRec initialises each shard on its own, so the same seed would give different tables for
    different world sizes or sharding types. Generating fixed row chunks from the seed makes the
    initial table independent of the plan, which is what lets tests compare sharded with unsharded.
    """
    weight = table.module.state_dict()[WEIGHT_KEY]
    dim = table.table_dim
    for shard in weight.local_shards():
        (row0, col0), (num_rows, num_cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
        first_chunk, last_chunk = row0 // _INIT_CHUNK_ROWS, (row0 + num_rows - 1) // _INIT_CHUNK_ROWS
        for chunk in range(first_chunk, last_chunk + 1):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + chunk)
            chunk_start = chunk * _INIT_CHUNK_ROWS
            rows = min(_INIT_CHUNK_ROWS, table.num_embeddings - chunk_start)
            values = torch.randn(rows, dim, generator=gen) * std
            lo, hi = max(row0, chunk_start), min(row0 + num_rows, chunk_start + rows)
            shard.tensor[lo - row0 : hi - row0].copy_(
                values[lo - chunk_start : hi - chunk_start, col0 : col0 + num_cols]
            )


def lookup(table: ShardedItemTable, ids: Tensor, device: torch.device) -> Tensor:
    """Embeddings ``[len(ids), embedding_dim]`` of ``ids`` through the sharded table.

    The stored padding columns are cut off, so they get no gradient. This is a collective: every
    rank must call it the same number of times (each with its own ids).
    """
    kjt = KeyedJaggedTensor(keys=FEATURES, values=ids, lengths=torch.tensor([len(ids)])).to(device)
    return table.module(kjt)[FEATURES[0]].values()[:, : table.embedding_dim]


@torch.no_grad()
def gather_full_table(table: ShardedItemTable, device: torch.device, chunk_rows: int = 65536) -> Tensor:
    """The whole table ``[num_embeddings, D]`` on every rank (for retrieval over all items).

    Each rank looks up an equal slice of the ids through the sharded module (works for every sharding
    type), then the slices are all-gathered.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
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
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered)[: table.num_embeddings]
