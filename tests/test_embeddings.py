"""The item table on 2 gloo processes: a learning rate set between steps reaches the real update.

Fused tables (row_wise, table_wise) update inside backward in fbgemm kernels, data_parallel tables
in a torch optimizer after it; the trainer's schedule must reach both (``ShardedItemTable.set_lr``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cluster.config import ConfigError
from train.config import EmbeddingTableConfig
from train.distributed import GLOO_THREADS_LEFT, destroy_distributed, live_gloo_threads
from train.embeddings import build_item_table, gather_full_table, lookup

pytestmark = pytest.mark.distributed


def _sgd_update(table, ids: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """One SGD update of a loss linear in the embeddings (its gradient is fixed); the change of the table."""
    before = gather_full_table(table, torch.device("cpu"))
    loss = (lookup(table, ids, torch.device("cpu")) * direction).sum()
    loss.backward()
    table.step()
    return gather_full_table(table, torch.device("cpu")) - before


def _check_set_lr(rank: int, sharding: str) -> None:
    cfg = EmbeddingTableConfig(sharding_type=sharding, optimizer="sgd", lr=1.0)
    table = build_item_table(cfg, num_items=30, embedding_dim=8, device=torch.device("cpu"), seed=0)
    gen = torch.Generator().manual_seed(rank)
    ids = torch.randint(1, 31, (12,), generator=gen)
    direction = torch.randn(12, 8, generator=gen)
    first = _sgd_update(table, ids, direction)
    assert first.abs().max() > 0.01, "the table did not move"
    # Gathered to one rank (what tracking.log_model uses): the same table there, nothing elsewhere.
    everywhere = gather_full_table(table, torch.device("cpu"))
    to_root = gather_full_table(table, torch.device("cpu"), chunk_rows=7, dst=1)
    if rank == 1:
        assert torch.equal(to_root, everywhere)
    else:
        assert to_root is None
    table.set_lr(0.25)
    assert table.lr == 0.25 and all(g["lr"] == 0.25 for g in table.optimizer.param_groups)
    second = _sgd_update(table, ids, direction)
    torch.testing.assert_close(second, 0.25 * first, rtol=1e-5, atol=1e-7)


def _set_lr_worker(rank: int, world_size: int, init_file: str, sharding: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _check_set_lr(rank, sharding)
    finally:
        destroy_distributed()
    # The group must really be gone, its threads joined, before interpreter shutdown (see
    # destroy_distributed); a reference left behind (e.g. a default argument bound to the group)
    # keeps them alive, and one of them can then abort the process on its way out.
    left = live_gloo_threads(wait_s=5.0)
    assert left == [], f"rank {rank}: {GLOO_THREADS_LEFT} {left}"


# table_wise puts the whole table on rank 0: rank 1's fused optimizer has no param groups at all.
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise", "data_parallel"])
def test_set_lr_scales_the_next_update(tmp_path, sharding):
    mp.spawn(_set_lr_worker, args=(2, str(tmp_path / "rendezvous"), sharding), nprocs=2, join=True)


def test_table_row_wise_is_refused_naming_the_key():
    """TorchRec shards an EmbeddingCollection (sequence embeddings) row-, table-, column-wise or
    replicated, never table_row_wise: the config value is refused before any planning, in one line."""
    cfg = EmbeddingTableConfig(sharding_type="table_row_wise")
    with pytest.raises(ConfigError, match="embeddings.sharding_type.*table_row_wise.*row_wise") as err:
        build_item_table(cfg, num_items=30, embedding_dim=8, device=torch.device("cpu"), seed=0)
    assert "\n" not in str(err.value)


def _global_mean_worker(rank: int, world_size: int, init_file: str, sharding: str) -> None:
    from train.tasks.base import StepContext

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        cfg = EmbeddingTableConfig(sharding_type=sharding, optimizer="sgd", lr=1.0)
        table = build_item_table(cfg, num_items=30, embedding_dim=8, device=torch.device("cpu"), seed=0)
        ctx = StepContext(step=0, seed=0, rank=rank, world_size=world_size, device=torch.device("cpu"), dense=None,
                          dense_dtype=torch.float32, grad_accum_steps=1, loss_scale=1.0)  # fmt: skip
        gen = torch.Generator().manual_seed(rank)
        num_local = 8
        ids = torch.randint(1, 31, (num_local,), generator=gen)
        direction = torch.randn(num_local, 8, generator=gen)
        counts = [torch.zeros(1, dtype=torch.long) for _ in range(world_size)]
        dist.all_gather(counts, torch.tensor([num_local]))
        num_global = int(sum(c.item() for c in counts))
        before = gather_full_table(table, torch.device("cpu"))
        # The trainer's loss: this rank's sum times world / global count (so that averaging over ranks,
        # as DDP does for the dense model, gives the global mean).
        loss = (ctx.lookup(table, ids) * direction).sum() * world_size / num_global
        loss.backward()
        table.step()
        change = gather_full_table(table, torch.device("cpu")) - before
        all_ids = [torch.zeros_like(ids) for _ in range(world_size)]
        all_dirs = [torch.zeros_like(direction) for _ in range(world_size)]
        dist.all_gather(all_ids, ids)
        dist.all_gather(all_dirs, direction)
        expected = torch.zeros_like(before)
        expected.index_add_(0, torch.cat(all_ids), -torch.cat(all_dirs) / num_global)
        torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-6)
    finally:
        destroy_distributed()


@pytest.mark.parametrize("sharding", ["row_wise", "table_wise", "column_wise", "data_parallel"])
def test_table_gets_the_global_mean_gradient(tmp_path, sharding):
    """With SGD (not scale-invariant like Adam or Adagrad), one step moves each row by exactly the
    global-batch mean gradient, whatever the sharding: TorchRec's own division by the world size in
    the model-parallel backward and DDP's averaging of a replicated table both accounted for."""
    mp.spawn(_global_mean_worker, args=(2, str(tmp_path / "rendezvous"), sharding), nprocs=2, join=True)
