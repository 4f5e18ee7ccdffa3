"""Sharded evaluation (each rank scores every rank's users against its own part of the item table)
against the gathered-table path, and both against a brute-force ranking, on 2 gloo processes.

The retrieval task's real ``eval_batch`` runs on a real TorchRec table of every sharding type:

- random table: sharded and gathered give the same ranks and top-k lists, bit for bit (this is what
  the canonical score blocks of ``train/scoring.py`` are for; plain BLAS products differ in the last bits);
- a table of one-hot and zero rows: every score is exact (q_k or 0) whatever the summation order, and
  most items tie, so a float64 brute force (count of eligible items scoring >= the target; lists by
  score desc then id asc) must agree exactly with both paths, ties included.

Ranks hold different numbers of rows (one rank has an extra batch and an empty one), so the
lockstep of the sharded path is exercised too. The catalogue spans three score blocks of 4096 items,
so row shards and lookup slices start in the middle of a block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed._shard.sharded_tensor import ShardedTensor

from train.batch import SequenceBatch, jagged_concat, split_inputs_targets, split_last
from train.config import load_train_config
from train.distributed import DistInfo, destroy_distributed
from train.embeddings import is_row_wise
from train.scoring import slice_score_chunks, slice_target_scores
from train.tasks.retrieval import RetrievalTask

NUM_ITEMS = 9000
DIM = 12  # not a multiple of 16: score blocks are copies, not views, on every path
TOP_K = 20
MAX_SEQ_LEN = 6


def _batches(rank: int) -> list[SequenceBatch]:
    """Rank 0: 3 batches, rank 1: 2 (one without any evaluable row); rows of 1..9 items."""
    gen = torch.Generator().manual_seed(100 + rank)
    sizes = [13, 7, 11] if rank == 0 else [9, 1]
    out = []
    for b, num_rows in enumerate(sizes):
        lengths = torch.randint(1 if num_rows == 1 else 2, 10, (num_rows,), generator=gen)
        if num_rows == 1:
            lengths[:] = 1  # no history: nothing to evaluate, but the rank still joins the collectives
        # Popular items 1..40 (so histories repeat items and targets recur in histories) plus any item.
        items = torch.where(
            torch.rand(int(lengths.sum()), generator=gen) < 0.5,
            torch.randint(1, 41, (int(lengths.sum()),), generator=gen),
            torch.randint(1, NUM_ITEMS + 1, (int(lengths.sum()),), generator=gen),
        )
        offsets = torch.zeros(num_rows + 1, dtype=torch.long)
        offsets[1:] = lengths.cumsum(0)
        users = torch.arange(num_rows) + 1000 * b + 100 * rank
        out.append(SequenceBatch(users, items, lengths, offsets, None))
    return out


def _extra_exclusions(batch: SequenceBatch, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, its items before the target and 0..5 random others, as the evaluator passes the whole
    history under eval.exclude=all_history (train.evaluation.UserHistory.exclusions)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, 6, (batch.num_rows,), generator=gen)
    values = torch.randint(1, NUM_ITEMS + 1, (int(lengths.sum()),), generator=gen)
    offsets = torch.zeros(batch.num_rows + 1, dtype=torch.long)
    offsets[1:] = lengths.cumsum(0)
    history, _ = split_last(batch)
    return jagged_concat((history.item_ids, history.offsets), (values, offsets))


def _task(sharding: str, scoring: str, info: DistInfo) -> RetrievalTask:
    extra = ["embeddings.min_partition=4"] if sharding == "column_wise" else []
    optimizer = "adam" if sharding == "data_parallel" else "rowwise_adagrad"
    cfg = load_train_config(
        None,
        [
            "data.dir=unused", f"model.embedding_dim={DIM}", "model.num_blocks=1", "model.num_heads=1",
            "model.attention_dim=8", "model.linear_dim=8", "model.dropout=0.0", f"model.max_seq_len={MAX_SEQ_LEN}",
            f"embeddings.sharding_type={sharding}", f"embeddings.optimizer={optimizer}", f"eval.scoring={scoring}",
            "embeddings.init_std=0.5", "model.use_time_bias=false", *extra,
        ],
    )  # fmt: skip
    return RetrievalTask(cfg, info, {"num_items": NUM_ITEMS})


@torch.no_grad()
def _set_rows(task: RetrievalTask, rows_ND: torch.Tensor) -> None:
    """Overwrite the whole table (every local shard of it) with ``rows_ND`` [NUM_ITEMS + 1, DIM]."""
    table = task.table
    weight = table.module.state_dict()[table.weight_key]
    padded = torch.zeros(rows_ND.shape[0], table.table_dim)
    padded[:, :DIM] = rows_ND
    if isinstance(weight, ShardedTensor):
        for shard in weight.local_shards():
            (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
            shard.tensor.copy_(padded[r0 : r0 + nr, c0 : c0 + nc])
    else:
        weight.copy_(padded)


def _run(task: RetrievalTask, encoder, batches, extra: bool, num_batches: int) -> list:
    """The task's eval over this rank's batches in lockstep (None past the end, as the evaluator does)."""
    prepared = task.prepare_eval(encoder)
    results = []
    for b in range(num_batches):
        batch = batches[b] if b < len(batches) else None
        exclude = _extra_exclusions(batch, 7 * b) if (extra and batch is not None) else None
        if not task.eval_in_lockstep() and batch is None:
            continue
        out = task.eval_batch(batch, prepared, TOP_K, exclude)
        if batch is not None:
            results.append((out.targets.clone(), out.ranks.clone(), out.top_ids.clone()))
    return results


@torch.no_grad()
def _brute_force(task, encoder, batches, extra: bool) -> list:
    """float64 ranks and top-k, one user at a time, from the stored table (exact for one-hot rows)."""
    from train.embeddings import gather_full_table

    raw = gather_full_table(task.table, task.device).float()
    unit = torch.nn.functional.normalize(raw, dim=-1).double()
    out = []
    for b, batch in enumerate(batches):
        inputs = split_inputs_targets(batch, MAX_SEQ_LEN, last_only=True)
        if len(inputs.targets) == 0:
            out.append(None)
            continue
        ex_v, ex_o = _extra_exclusions(batch, 7 * b) if extra else (None, None)
        kept = torch.nonzero(inputs.keep_rows).flatten().tolist()
        ranks, tops = [], []
        for i, row in enumerate(kept):
            ids = inputs.input_ids[inputs.offsets[i] : inputs.offsets[i + 1]]
            query = encoder(raw[ids], torch.tensor([0, len(ids)]), len(ids), None, None)[-1].double()
            scores = (unit @ query).numpy()
            target = int(inputs.targets[i])
            excluded = set(ex_v[ex_o[row] : ex_o[row + 1]].tolist()) if extra else set(ids.tolist())
            excluded.discard(target)
            eligible = np.array([j for j in range(1, NUM_ITEMS + 1) if j not in excluded])
            ranks.append(int((scores[eligible] >= scores[target]).sum()) - 1)
            order = sorted(eligible.tolist(), key=lambda j: (-scores[j], j))[:TOP_K]
            tops.append(order + [0] * (TOP_K - len(order)))
        out.append((torch.tensor(ranks), torch.tensor(tops)))
    return out


def _worker(rank: int, world_size: int, init_file: str, sharding: str, result_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        info = DistInfo(rank, world_size, rank, torch.device("cpu"), "gloo")
        batches = _batches(rank)
        tasks = {scoring: _task(sharding, scoring, info) for scoring in ("sharded", "gathered")}
        for task in tasks.values():
            task.build_tables()
        # row_wise scores each rank's own TorchRec shard in place (the others look up equal slices).
        assert is_row_wise(tasks["sharded"].table) == (sharding == "row_wise")
        torch.manual_seed(0)
        encoder = tasks["sharded"].build_dense().eval()
        num_batches = 3
        checks = 0
        # 1. Random table: sharded == gathered, bit for bit (ranks and lists).
        for extra in (False, True):
            sharded = _run(tasks["sharded"], encoder, batches, extra, num_batches)
            gathered = _run(tasks["gathered"], encoder, batches, extra, num_batches)
            for (t1, r1, k1), (t2, r2, k2) in zip(sharded, gathered, strict=True):
                assert torch.equal(t1, t2) and torch.equal(r1, r2), (sharding, extra, r1, r2)
                assert torch.equal(k1, k2), (sharding, extra)
                checks += len(t1)
        # 2. One-hot and zero rows (exact scores, ties everywhere): both paths == brute force.
        gen = torch.Generator().manual_seed(5)
        rows = torch.nn.functional.one_hot(
            torch.randint(0, DIM, (NUM_ITEMS + 1,), generator=gen), DIM
        ).float()
        rows *= (torch.rand(NUM_ITEMS + 1, 1, generator=gen) < 0.9).float()  # ~10% zero rows: score 0
        for task in tasks.values():
            _set_rows(task, rows)
        for extra in (False, True):
            brute = _brute_force(tasks["gathered"], encoder, batches, extra)
            for scoring, task in tasks.items():
                got = _run(task, encoder, batches, extra, num_batches)
                for (targets, ranks, top), expected in zip(got, brute, strict=True):
                    if expected is None:
                        assert len(targets) == 0
                        continue
                    assert torch.equal(ranks, expected[0]), (sharding, scoring, extra, ranks, expected[0])
                    assert torch.equal(top, expected[1]), (sharding, scoring, extra)
                    checks += len(targets)
        counts = torch.tensor([checks])
        dist.all_reduce(counts)
        if rank == 0:
            with open(result_file, "w") as f:
                f.write(str(int(counts)))
    finally:
        destroy_distributed()


def _slice_scores(query_BD, rows_ND, bounds) -> torch.Tensor:
    """Scores [B, N] assembled from the canonical chunks of the slices ``rows[bounds[i]:bounds[i+1]]``."""
    parts = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        chunks = list(slice_score_chunks(query_BD, rows_ND[lo:hi], lo))
        assert [c[0] for c in chunks][0] == lo
        parts += [c[1] for c in chunks]
    return torch.cat(parts, 1)


def test_canonical_scores_do_not_depend_on_the_partition():
    """The same bits for every (query, item) whichever slice holds the item and wherever the query sits:
    plain ``query @ slice.T`` does not give that with MKL at D = 64 (measured: last-bit differences)."""
    gen = torch.Generator().manual_seed(0)
    rows = torch.nn.functional.normalize(torch.randn(9001, 64, generator=gen), dim=-1)
    query = torch.randn(70, 64, generator=gen)
    whole = _slice_scores(query, rows, [0, 9001])
    for bounds in ([0, 4501, 9001], [0, 1237, 4096, 8191, 9001], [0, 1, 3000, 9000, 9001]):
        assert torch.equal(_slice_scores(query, rows, bounds), whole), bounds
    # A query's scores do not depend on the other queries of the batch (padded to the same block position).
    assert torch.equal(_slice_scores(query[32:40], rows, [0, 9001]), whole[32:40])
    # The target's own score is the bits of its entry in the chunks (what rank counting compares with).
    targets = torch.randint(1, 9001, (70,), generator=gen)
    for lo, hi in ([0, 4501], [4501, 9001]):
        owned, scores = slice_target_scores(query, rows[lo:hi], lo, targets)
        rows_owned = owned.nonzero().flatten()
        assert torch.equal(scores[rows_owned], whole[rows_owned, targets[rows_owned]])


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["row_wise", "table_wise", "column_wise", "data_parallel"])
def test_sharded_topk_and_ranks_equal_gathered_and_brute_force(tmp_path, sharding):
    result = tmp_path / "checks"
    mp.spawn(_worker, args=(2, str(tmp_path / "rendezvous"), sharding, str(result)), nprocs=2, join=True)
    # Rows compared over both ranks: (2 tables) x (2 exclusion modes) x 2 paths, none silently skipped.
    assert int(result.read_text()) > 150
