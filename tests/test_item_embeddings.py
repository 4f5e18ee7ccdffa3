"""Semantic-ID item embeddings (train/item_embeddings.py) on 2 gloo processes, row-wise sharded:
an item's embedding is the sum of its codes' rows, and its gradient reaches exactly those rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from train.config import EmbeddingTableConfig
from train.distributed import destroy_distributed
from train.embeddings import build_table, gather_full_table
from train.item_embeddings import SemanticIdItemEmbeddings, code_table_token_ids
from train.tasks.base import StepContext

pytestmark = pytest.mark.distributed

CODEBOOKS = [4, 3, 2]  # 3 levels; 24 possible tuples
NUM_ITEMS = 15


def _codes() -> np.ndarray:
    rng = np.random.default_rng(0)
    tuples = np.array([(a, b, c) for a in range(4) for b in range(3) for c in range(2)])
    codes = np.full((NUM_ITEMS + 1, 3), -1, dtype=np.int64)
    codes[1:] = tuples[rng.permutation(len(tuples))[:NUM_ITEMS]]
    return codes


def _worker(rank: int, world_size: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        codes = _codes()
        tokens = code_table_token_ids(codes, CODEBOOKS)
        assert tokens[0].tolist() == [0, 0, 0] and tokens[1:].min() >= 1 and tokens.max() == sum(CODEBOOKS)
        cfg = EmbeddingTableConfig(sharding_type="row_wise", optimizer="sgd", lr=1.0)
        table = build_table(cfg, 1 + sum(CODEBOOKS), 8, torch.device("cpu"), seed=0, name="item_code_table",
                            feature="code_ids")  # fmt: skip
        items = SemanticIdItemEmbeddings(table, tokens)
        before = gather_full_table(table, torch.device("cpu"))
        # Every item's embedding is the sum of its codes' rows: level offsets 1, 5, 8.
        full = items.full(torch.device("cpu"))
        for d in range(1, NUM_ITEMS + 1):
            a, b, c = codes[d]
            torch.testing.assert_close(full[d], before[1 + a] + before[5 + b] + before[8 + c])
        gen = torch.Generator().manual_seed(rank)
        ids = torch.randint(1, NUM_ITEMS + 1, (10,), generator=gen)
        direction = torch.randn(10, 8, generator=gen)
        ctx = StepContext(step=0, seed=0, rank=rank, world_size=world_size, device=torch.device("cpu"), dense=None,
                          dense_dtype=torch.float32, grad_accum_steps=1, loss_scale=1.0)  # fmt: skip
        emb = items.lookup(ids, ctx)
        torch.testing.assert_close(emb, full[ids])
        # The trainer's loss scaling (x world, see tests/test_embeddings.py): the table gets the sum.
        ((emb * direction).sum() * world_size).backward()
        table.step()
        change = gather_full_table(table, torch.device("cpu")) - before
        # Brute force over both ranks' ids: each code row moves by -lr * the directions of the items using it.
        all_ids = [torch.zeros_like(ids) for _ in range(world_size)]
        all_dirs = [torch.zeros_like(direction) for _ in range(world_size)]
        dist.all_gather(all_ids, ids)
        dist.all_gather(all_dirs, direction)
        expected = torch.zeros_like(before)
        for i, v in zip(torch.cat(all_ids), torch.cat(all_dirs)):
            for row in tokens[i]:
                expected[row] -= v
        torch.testing.assert_close(change, expected, rtol=1e-5, atol=1e-5)
    finally:
        destroy_distributed()


def test_semantic_id_items_sum_their_code_rows_and_train_them(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True)


@pytest.mark.slow
def test_trainer_with_semantic_id_items(train_runs, synthetic_semantic_ids):
    """model.item_embedding=semantic_ids through the real trainer (2 processes, row-wise code table):
    it learns, and its checkpoint holds the code table, one row per code and level, not an item table."""
    import json

    from data_pipeline.semantic_ids.fallback import load_checkpoint_item_table
    from data_pipeline.semantic_ids.table import read_semantic_ids
    from tests.test_trainer import EXACT

    args = [*EXACT, "model.item_embedding=semantic_ids", f"model.semantic_ids_dir={synthetic_semantic_ids}",
            "embeddings.sharding_type=row_wise", "run.epochs=3"]  # fmt: skip
    run = train_runs(args, nproc=2)
    losses = run.losses
    steps = sorted(losses)
    assert losses[steps[-1]] < 0.8 * losses[steps[0]], losses
    assert run.final["test"]["num_users"] > 0 and run.final["test"]["hr@10"] > 0
    checkpoint = sorted((run.output_dir / "checkpoints").glob("step_*"))[-1]
    sid = read_semantic_ids(synthetic_semantic_ids)
    meta = dcp.FileSystemReader(str(checkpoint / "sparse")).read_metadata()
    keys = [k for k in meta.state_dict_metadata if k.endswith(".weight") and ".model." in k]
    assert keys and all(k.startswith("item_code_table.") for k in keys), keys
    (weight,) = keys
    assert meta.state_dict_metadata[weight].size[0] == 1 + sum(sid.codebook_sizes)
    assert json.loads((checkpoint / "meta.json").read_text())["num_items"] > 0
    with pytest.raises(ValueError, match="no 'item_table'"):
        load_checkpoint_item_table(checkpoint)  # the text fallback needs a free item table
