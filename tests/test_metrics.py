"""Tests for train.metrics against brute-force NumPy computations (loops over users, explicit sorts)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from train.evaluation import evaluate_popularity
from train.metrics import (
    NOT_FOUND_RANK,
    RetrievalMetrics,
    item_counts,
    popularity_baseline,
    popularity_ranks,
    rank_of_targets,
    ranks_from_embeddings,
    ranks_from_topk,
    topk_from_embeddings,
    topk_items,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_reader import write_test_shards  # noqa: E402


def random_case(seed: int, num_users: int = 24, num_items: int = 60, levels: int = 6):
    """Scores with many ties (few distinct levels) and some NaN; jagged histories with repeats and 0s."""
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, levels, size=(num_users, num_items + 1)).astype(np.float32)
    scores[rng.random(scores.shape) < 0.02] = np.nan
    targets = rng.integers(1, num_items + 1, size=num_users)
    histories = []
    for u in range(num_users):
        h = rng.integers(0, num_items + 1, size=int(rng.integers(0, 25))).tolist()
        if rng.random() < 0.3:
            h.append(int(targets[u]))  # the target also in the history: must stay eligible
        histories.append(h)
    values = np.array([i for h in histories for i in h], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum([len(h) for h in histories])]).astype(np.int64)
    return scores, targets, histories, torch.from_numpy(values), torch.from_numpy(offsets)


def eligible_items(num_items: int, history: list[int], target: int) -> list[int]:
    return [j for j in range(1, num_items + 1) if j not in set(history) or j == target]


def brute_rank(scores_row: np.ndarray, history: list[int], target: int) -> int:
    """Pessimistic rank by explicit sort: descending score, the target after its ties; NaN = -inf."""
    s = np.where(np.isnan(scores_row), -np.inf, scores_row.astype(np.float64))
    items = eligible_items(len(s) - 1, history, target)
    ordered = sorted(items, key=lambda j: (-s[j], j == target))
    return ordered.index(target)


def brute_topk(scores_row: np.ndarray, history: list[int], keep: int | None, k: int) -> list[int]:
    s = np.where(np.isnan(scores_row), -np.inf, scores_row.astype(np.float64))
    items = [j for j in range(1, len(s)) if j not in set(history) or j == keep]
    ordered = [j for j in sorted(items, key=lambda j: (-s[j], j)) if s[j] > -np.inf][:k]
    return ordered + [0] * (k - len(ordered))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("chunk_size", [7, 65536])
def test_rank_of_targets_matches_brute_force(seed, chunk_size):
    scores, targets, histories, values, offsets = random_case(seed)
    ranks = rank_of_targets(
        torch.from_numpy(scores), torch.from_numpy(targets), values, offsets, chunk_size=chunk_size
    )
    want = [brute_rank(scores[u], histories[u], int(targets[u])) for u in range(len(targets))]
    assert ranks.tolist() == want
    # Without exclusions every item but padding is eligible.
    none = rank_of_targets(torch.from_numpy(scores), torch.from_numpy(targets), chunk_size=chunk_size)
    assert none.tolist() == [brute_rank(scores[u], [], int(targets[u])) for u in range(len(targets))]


def test_ties_are_pessimistic_and_nan_is_worst():
    scores = torch.tensor([[9.0, 1.0, 1.0, 1.0, 0.5], [9.0, 0.1, float("nan"), 3.0, 2.0]])
    # Row 0: target 2 ties with items 1 and 3 -> rank 2 (both counted above). Row 1: NaN target -> last.
    assert rank_of_targets(scores, torch.tensor([2, 2])).tolist() == [2, 3]
    # History exclusion removes tied competitors; padding (column 0, score 9) never counts.
    excl = rank_of_targets(scores, torch.tensor([2, 2]), torch.tensor([1, 3, 3]), torch.tensor([0, 2, 3]))
    assert excl.tolist() == [0, 2]


def test_input_errors():
    scores = torch.zeros(2, 5)
    with pytest.raises(ValueError, match="target ids must be in 1..4"):
        rank_of_targets(scores, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="history item ids must be in 0..4"):
        rank_of_targets(scores, torch.tensor([1, 1]), torch.tensor([7]), torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="exclude_offsets must have shape"):
        rank_of_targets(scores, torch.tensor([1, 1]), torch.tensor([2]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="ranks must be >= 0"):
        RetrievalMetrics().update(torch.tensor([-1]))


@pytest.mark.parametrize("chunk_size", [5, 65536])
def test_ranks_from_embeddings_match_matrix(chunk_size):
    rng = np.random.default_rng(3)
    # Small integer embeddings: dot products are exact in float32, so ties are exact too.
    query = torch.from_numpy(rng.integers(-2, 3, size=(16, 4)).astype(np.float32))
    items = torch.from_numpy(rng.integers(-2, 3, size=(41, 4)).astype(np.float32))
    _, targets, histories, values, offsets = random_case(4, num_users=16, num_items=40)
    targets_t = torch.from_numpy(targets)
    scores = query @ items.T
    want = [brute_rank(scores[u].numpy(), histories[u], int(targets[u])) for u in range(16)]
    ranks = ranks_from_embeddings(query, items, targets_t, values, offsets, chunk_size=chunk_size)
    assert ranks.tolist() == want == rank_of_targets(scores, targets_t, values, offsets).tolist()
    top = topk_from_embeddings(query, items, values, offsets, k=12, chunk_size=chunk_size)
    assert top.tolist() == topk_items(scores, values, offsets, k=12).tolist()


def test_ranks_from_embeddings_exact_ties_with_float_embeddings():
    # Items that copy the target's embedding tie with it exactly in the matmul; the target's score
    # must come out bit-identical so that the copies count as ties (pessimistic), not as noise.
    # (An elementwise dot product differs from the matmul in the last bit for most rows.)
    torch.manual_seed(0)
    query, items = torch.randn(64, 48), torch.randn(3001, 48)
    targets = torch.randperm(1500)[:64] + 1  # distinct targets in 1..1500
    for row in range(32):
        items[1501 + row] = items[targets[row]]  # one copy per target of the first 32 rows
    chunks = torch.cat([query @ items[a : a + 512].T for a in range(0, 3001, 512)], 1)
    ranks = ranks_from_embeddings(query, items, targets, chunk_size=512)
    assert ranks.tolist() == rank_of_targets(chunks, targets).tolist()


@pytest.mark.parametrize(("seed", "levels"), [(0, 6), (5, 6), (6, 40), (7, 10**6)])
@pytest.mark.parametrize(("k", "chunk_size"), [(1, 65536), (10, 7), (10, 65536), (70, 16)])
def test_topk_items_matches_brute_force(seed, levels, k, chunk_size):
    # levels=6: ties everywhere (exact tie resolution); 10**6: almost none (the topk fast path).
    scores, targets, histories, values, offsets = random_case(seed, levels=levels)
    scores_t = torch.from_numpy(scores)
    before = scores_t.clone()
    top = topk_items(scores_t, values, offsets, k=k, chunk_size=chunk_size)
    assert torch.equal(scores_t.nan_to_num(-1), before.nan_to_num(-1))  # caller's scores untouched
    assert top.tolist() == [brute_topk(scores[u], histories[u], None, k) for u in range(len(targets))]
    kept = topk_items(
        scores_t, values, offsets, k=k, keep_ids=torch.from_numpy(targets), chunk_size=chunk_size
    )
    assert kept.tolist() == [
        brute_topk(scores[u], histories[u], int(targets[u]), k) for u in range(len(targets))
    ]


def test_topk_orders_ties_above_the_cut_by_id():
    # Many equal scores above the k-th value but none tied with it: topk's own order among them is
    # arbitrary, the result must list them by ascending id.
    first = [0.0] + [5.0] * 30 + [4.0] + [1.0] * 10
    second = [0.0] + [1.0] * 10 + [4.0] + [5.0] * 30
    top = topk_items(torch.tensor([first, second]), k=31)
    assert top[0].tolist() == list(range(1, 32))
    assert top[1].tolist() == list(range(12, 42)) + [11]


def test_topk_agrees_with_ranks_without_ties():
    rng = np.random.default_rng(7)
    scores = torch.from_numpy(rng.standard_normal((32, 101)).astype(np.float32))
    _, targets, _, values, offsets = random_case(8, num_users=32, num_items=100)
    targets_t = torch.from_numpy(targets)
    ranks = rank_of_targets(scores, targets_t, values, offsets)
    top = topk_items(scores, values, offsets, k=20, keep_ids=targets_t)
    assert ranks_from_topk(top, targets_t).clamp(max=20).tolist() == ranks.clamp(max=20).tolist()
    missing = ranks_from_topk(torch.tensor([[3, 4]]), torch.tensor([9]))
    assert missing.tolist() == [NOT_FOUND_RANK]


def brute_metrics(ranks: list[int], ks_hr=(1, 10, 50, 200), ks_ndcg=(10, 50, 200)) -> dict[str, float]:
    out = {}
    for k in ks_hr:
        out[f"hr@{k}"] = sum(1.0 for r in ranks if r < k) / len(ranks)
    for k in ks_ndcg:
        out[f"ndcg@{k}"] = sum(1.0 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    out["mrr"] = sum(1.0 / (r + 1) for r in ranks) / len(ranks)
    out["num_users"] = len(ranks)
    return out


def test_retrieval_metrics_accumulate():
    rng = np.random.default_rng(9)
    ranks = rng.integers(0, 400, size=1000).tolist()
    m = RetrievalMetrics()
    for i in range(0, 1000, 128):
        m.update(torch.tensor(ranks[i : i + 128]))
    got = m.compute()
    want = brute_metrics(ranks)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key
    m.reset()
    empty = m.compute()
    assert empty["num_users"] == 0 and math.isnan(empty["hr@10"])
    custom = RetrievalMetrics(ks_hr=(5,), ks_ndcg=(5,))
    custom.update(torch.tensor([0, 4, 5]))
    assert custom.compute() == pytest.approx(brute_metrics([0, 4, 5], (5,), (5,)))


def test_popularity_ranks_match_matrix_ranking():
    _, targets, histories, values, offsets = random_case(11, num_users=40, num_items=50)
    rng = np.random.default_rng(12)
    counts = torch.from_numpy(rng.integers(0, 8, size=51))  # many equal counts: ties
    targets_t = torch.from_numpy(targets)
    expanded = counts.float().expand(40, -1)
    want = [brute_rank(expanded[u].numpy(), histories[u], int(targets[u])) for u in range(40)]
    assert popularity_ranks(counts, targets_t, values, offsets).tolist() == want
    assert rank_of_targets(expanded, targets_t, values, offsets).tolist() == want
    got = popularity_baseline(counts, targets_t, values, offsets)
    assert got == pytest.approx(brute_metrics(want))


def test_evaluate_popularity_on_shards(tmp_path):
    data_dir, expected = write_test_shards(tmp_path, num_users=30, num_items=25, row_group_size=4)
    counts = np.zeros(26)
    for items, _ in expected["train"].values():
        np.add.at(counts, items, 1)
    counts[0] = 0
    ranks = []
    for _, (items, _) in sorted(expected["test"].items()):
        row = np.broadcast_to(counts, (26,)).astype(np.float64)
        ranks.append(brute_rank(row, items[:-1], items[-1]))
    assert evaluate_popularity(data_dir, "test", batch_size=7) == pytest.approx(brute_metrics(ranks))
    assert item_counts(torch.tensor([1, 1, 3, 0]), 4).tolist() == [0, 2, 0, 1, 0]


# --------------------------------------------------------------------------------- distributed


def _compute_worker(rank: int, world_size: int, init_file: str, ranks_per_rank: list[list[int]]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        m = RetrievalMetrics()
        mine = ranks_per_rank[rank]
        for i in range(0, len(mine), 16):
            m.update(torch.tensor(mine[i : i + 16]))
        got = m.compute()
        want = brute_metrics([r for rs in ranks_per_rank for r in rs])
        assert got == pytest.approx(want, rel=1e-12), (rank, got, want)
        local = m.compute(all_reduce=False)
        assert local["num_users"] == len(mine)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_compute_all_reduces_over_two_gloo_processes(tmp_path):
    rng = np.random.default_rng(13)
    # Different counts per rank: the all-reduce must sum raw sums, not average rank means.
    ranks_per_rank = [rng.integers(0, 300, size=50).tolist(), rng.integers(0, 300, size=83).tolist()]
    mp.spawn(_compute_worker, args=(2, str(tmp_path / "rendezvous"), ranks_per_rank), nprocs=2, join=True)


# ------------------------------------------------------------------------------------ real data


@pytest.mark.slow
@pytest.mark.shared_data
def test_popularity_baseline_ml1m_matches_brute_force_from_raw_file(tmp_path):
    """Prepare ML-1M with the real job, then compare evaluate_popularity with a computation done
    straight from sequences.txt (raw ids, leave-one-out, rows cut to max_seq_len + 1 = 201)."""
    from conftest import ROOT, shared_data_dir

    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare

    seq_file = shared_data_dir("ml-1m") / "sequences.txt"
    cfg = load_config(
        PrepareConfig,
        ROOT / "configs" / "data" / "ml1m.yaml",
        [
            "input.format=sequences",
            f"input.paths=[{seq_file}]",
            "input.item_metadata=null",
            f"output.dir={tmp_path / 'ml1m'}",
            "ray.num_cpus=2",
        ],
    )
    prepare(cfg)
    got = evaluate_popularity(tmp_path / "ml1m", "test")

    seqs = [line.split()[1:] for line in seq_file.read_text().splitlines()]
    counts: dict[str, int] = {}
    for s in seqs:
        for item in s[:-2][-201:]:  # train rows only
            counts[item] = counts.get(item, 0) + 1
    all_counts = np.array([counts.get(i, 0) for i in {i for s in seqs for i in s}])
    ranks = []
    for s in seqs:
        target, c = s[-1], counts.get(s[-1], 0)
        history = set(s[:-1][-200:]) - {target}
        ranks.append(int((all_counts >= c).sum()) - 1 - sum(counts.get(h, 0) >= c for h in history))
    assert got == pytest.approx(brute_metrics(ranks), rel=1e-9)
    assert got["num_users"] == 6040 and 0.03 < got["hr@10"] < 0.04  # popularity HR@10 = 0.0344
