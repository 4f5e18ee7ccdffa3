"""Retrieval metrics over the full item catalog, history excluded (the HSTU reference protocol).

For each evaluated user, the model scores every item; the target's rank is computed among the
*eligible* items: all ids 1..num_items except padding (0) and except items in the user's history,
but the target itself is never excluded even when it also appears in the history.

    HR@k   = mean(rank < k)
    NDCG@k = mean(1 / log2(rank + 2) if rank < k else 0)     (one relevant item, so IDCG = 1)
    MRR    = mean(1 / (rank + 1))

Tie policy: **pessimistic**. An eligible item whose score equals the target's counts as ranked
above it, so rank = #{eligible items j != target : score_j >= score_target}. A model that gives
every item the same score (e.g. collapsed embeddings) therefore gets the worst rank instead of a
flattering one. (The HSTU reference takes ``torch.topk``, whose order among tied scores is
unspecified.) NaN scores count as -inf; a NaN target score gets the worst rank.
``topk_items`` lists items by descending score with ties broken by ascending id (the deterministic
order; under pessimistic ranking a tied target can be inside a top-k list yet have rank >= k).

Memory: functions taking a score matrix ``[B, num_items + 1]`` process it in column chunks, so
their temporaries stay small; ``ranks_from_embeddings`` / ``topk_from_embeddings`` never build the
full matrix (scores = query @ item_emb[chunk].T, one chunk at a time), for catalogs of millions.

Shape legend: B = users in the batch, N1 = num_items + 1 (column 0 = padding), T = history items
in the batch (jagged), D = embedding dim, K = k of top-k, C = columns in a chunk.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "rank_of_targets",
    "topk_items",
    "ranks_from_embeddings",
    "topk_from_embeddings",
    "ranks_from_topk",
    "RetrievalMetrics",
    "item_counts",
    "popularity_ranks",
    "popularity_baseline",
]

logger = logging.getLogger(__name__)

DEFAULT_CHUNK = 65536
# Rank given by ranks_from_topk to a target absent from the list: HR/NDCG = 0, MRR contribution ~0.
NOT_FOUND_RANK = 2**62


# --------------------------------------------------------------------------------------- inputs


def _check_targets(target_ids: Tensor, num_cols: int) -> None:
    if target_ids.dim() != 1:
        raise ValueError(f"target_ids must be 1-D [B], got shape {tuple(target_ids.shape)}")
    if target_ids.numel() and (int(target_ids.min()) < 1 or int(target_ids.max()) >= num_cols):
        raise ValueError(
            f"target ids must be in 1..{num_cols - 1} (0 is padding); got min {int(target_ids.min())}, "
            f"max {int(target_ids.max())}"
        )


def _excluded_pairs(
    num_rows: int,
    num_cols: int,
    exclude_values: Tensor | None,
    exclude_offsets: Tensor | None,
    keep_ids: Tensor | None,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """Distinct (row, item) pairs to exclude: history items except padding and except ``keep_ids[row]``."""
    if exclude_values is None or exclude_values.numel() == 0:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty
    if exclude_offsets is None or exclude_offsets.shape != (num_rows + 1,):
        raise ValueError(f"exclude_offsets must have shape [B+1] = [{num_rows + 1}] alongside exclude_values")
    values = exclude_values.to(device=device, dtype=torch.long)
    offsets = exclude_offsets.to(device=device, dtype=torch.long)
    if int(values.min()) < 0 or int(values.max()) >= num_cols:
        raise ValueError(
            f"history item ids must be in 0..{num_cols - 1}; got {int(values.min())}..{int(values.max())}"
        )
    rows = torch.repeat_interleave(torch.arange(num_rows, device=device), offsets[1:] - offsets[:-1])
    keep = values != 0
    if keep_ids is not None:
        keep &= values != keep_ids.to(device)[rows]
    # Dedup: a repeated history item is still one excluded item.
    key = torch.unique(rows[keep] * num_cols + values[keep])
    return key // num_cols, key % num_cols


def _float(scores: Tensor) -> Tensor:
    return scores if scores.is_floating_point() else scores.float()


def _nan_to_neginf_(scores: Tensor) -> Tensor:
    """NaN -> -inf in place (so NaN never looks better than a real score); a no-op pass when clean."""
    nan = torch.isnan(scores)
    if bool(nan.any()):
        scores.masked_fill_(nan, -math.inf)
    return scores


# A chunk source yields (first column, scores [B, C], whether the chunk is a view of caller memory).
def _matrix_chunks(scores_BN1: Tensor, chunk_size: int) -> Iterator[tuple[int, Tensor, bool]]:
    for start in range(0, scores_BN1.shape[1], chunk_size):
        yield start, _float(scores_BN1[:, start : start + chunk_size]), scores_BN1.is_floating_point()


def _embedding_chunks(
    query_BD: Tensor, item_emb_N1D: Tensor, chunk_size: int
) -> Iterator[tuple[int, Tensor, bool]]:
    for start in range(0, item_emb_N1D.shape[0], chunk_size):
        yield start, _float(query_BD @ item_emb_N1D[start : start + chunk_size].T), False


def _target_dot(query_BD: Tensor, item_emb_N1D: Tensor, target_ids: Tensor, block: int = 1024) -> Tensor:
    """Score of each row's target, via the same matmul kernel as the chunks (diagonal of a block
    product), so that the target's score matches its in-chunk score bit for bit in practice (BLAS
    does not promise it; an elementwise dot product differs in the last bit ~80% of the time)."""
    parts = []
    for a in range(0, query_BD.shape[0], block):
        q, t = query_BD[a : a + block], target_ids[a : a + block]
        parts.append((q @ item_emb_N1D[t].T).diagonal())
    return torch.cat(parts) if parts else query_BD.new_zeros(0)


# ---------------------------------------------------------------------------------------- ranks


def _rank_core(
    chunks: Iterator[tuple[int, Tensor, bool]],
    num_cols: int,
    target_scores_B: Tensor,
    target_ids: Tensor,
    excl_rows: Tensor,
    excl_items: Tensor,
    fix_worst: bool = True,
) -> Tensor:
    """Pessimistic rank: eligible items (not padding, not excluded, not the target) scoring >= the target.

    ``fix_worst=False`` leaves NaN/-inf targets to the caller (a count over part of the items,
    ``train/scoring.py``, where the worst rank is only known after the parts are summed).
    """
    num_rows = target_ids.shape[0]
    rows = torch.arange(num_rows, device=target_ids.device)
    t_B1 = _float(target_scores_B)[:, None]
    rank_B = torch.zeros(num_rows, dtype=torch.long, device=target_ids.device)
    for start, chunk_BC, _ in chunks:
        stop = start + chunk_BC.shape[1]
        # NaN item scores compare False here, i.e. rank below any target; NaN/-inf targets are
        # fixed up after the loop. This avoids rewriting every chunk.
        ge_BC = chunk_BC >= t_B1
        if start == 0:
            ge_BC[:, 0] = False  # padding is never a candidate
        rank_B += ge_BC.sum(1, dtype=torch.int32)  # int32 accumulation is ~2.5x faster than bool->int64
        # Take back what excluded history items and the target itself contributed.
        in_chunk = (excl_items >= start) & (excl_items < stop)
        r, c = excl_rows[in_chunk], excl_items[in_chunk] - start
        rank_B.index_add_(0, r, -ge_BC[r, c].long())
        in_chunk = (target_ids >= start) & (target_ids < stop)
        r = rows[in_chunk]
        rank_B.index_add_(0, r, -ge_BC[r, target_ids[in_chunk] - start].long())
    # A NaN or -inf target ties with (or trails) every eligible item: the worst rank.
    worst = torch.isnan(target_scores_B) | torch.isneginf(target_scores_B)
    if fix_worst and bool(worst.any()):
        num_excluded = torch.bincount(excl_rows, minlength=num_rows)
        rank_B = torch.where(worst, (num_cols - 2) - num_excluded, rank_B)
    return rank_B


def rank_of_targets(
    scores: Tensor,
    target_ids: Tensor,
    exclude_values: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """0-based rank [B] of each target among eligible items, from a score matrix ``[B, num_items+1]``.

    ``exclude_values``/``exclude_offsets`` are the jagged history (row i excludes
    ``exclude_values[offsets[i]:offsets[i+1]]``); the target is never excluded. Pessimistic ties.
    """
    if scores.dim() != 2 or scores.shape[0] != target_ids.shape[0]:
        raise ValueError(
            f"scores must be [B, num_items+1] with B = len(target_ids); got {tuple(scores.shape)}"
        )
    _check_targets(target_ids, scores.shape[1])
    target_ids = target_ids.to(scores.device, torch.long)
    excl_rows, excl_items = _excluded_pairs(
        scores.shape[0], scores.shape[1], exclude_values, exclude_offsets, target_ids, scores.device
    )
    target_scores = scores.gather(1, target_ids[:, None])[:, 0]
    chunks = _matrix_chunks(scores, chunk_size)
    return _rank_core(chunks, scores.shape[1], target_scores, target_ids, excl_rows, excl_items)


def ranks_from_embeddings(
    query_BD: Tensor,
    item_emb_N1D: Tensor,
    target_ids: Tensor,
    exclude_values: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    *,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """``rank_of_targets`` for dot-product scores ``query_BD @ item_emb_N1D.T`` without the full matrix.

    Row 0 of ``item_emb_N1D`` is padding. The target's own score is computed with the same
    matmul kernel as the chunks, so exact ties are treated as in ``rank_of_targets`` (bitwise
    equality of the two products is what CPU BLAS does in practice, not a documented promise).
    """
    num_cols = item_emb_N1D.shape[0]
    _check_targets(target_ids, num_cols)
    target_ids = target_ids.to(query_BD.device, torch.long)
    excl_rows, excl_items = _excluded_pairs(
        query_BD.shape[0], num_cols, exclude_values, exclude_offsets, target_ids, query_BD.device
    )
    target_scores = _target_dot(query_BD, item_emb_N1D, target_ids)
    chunks = _embedding_chunks(query_BD, item_emb_N1D, chunk_size)
    return _rank_core(chunks, num_cols, target_scores, target_ids, excl_rows, excl_items)


def ranks_from_topk(topk_ids_BK: Tensor, target_ids: Tensor) -> Tensor:
    """Ranks from ranked candidate lists (e.g. TIGER beam search): position of the target, or
    ``NOT_FOUND_RANK`` when absent, so HR@k and NDCG@k are exact for k <= K and MRR is truncated at K."""
    hit_BK = topk_ids_BK == target_ids[:, None].to(topk_ids_BK.device)
    first = torch.where(hit_BK.any(1), hit_BK.int().argmax(1), torch.full_like(target_ids, NOT_FOUND_RANK))
    return first.long()


# ---------------------------------------------------------------------------------------- top-k


def _best_k(scores_BC: Tensor, first_id: int, k: int) -> tuple[Tensor, Tensor]:
    """The k best (score desc, id asc) entries of each row; column c holds item ``first_id + c``."""
    num_rows, num_cols = scores_BC.shape
    k = min(k, num_cols)
    vals_BK, cols_BK = scores_BC.topk(k, dim=1)
    thr_B1 = vals_BK[:, -1:]
    # topk's choice among entries tied with the k-th value is unspecified. When no row has such a
    # tie reaching past position k (the usual case for float scores), its set is already right.
    if torch.equal(
        (scores_BC == thr_B1).sum(1, dtype=torch.int32), (vals_BK == thr_B1).sum(1, dtype=torch.int32)
    ):
        cols_BK, by_col = cols_BK.sort(dim=1)
        vals_BK = vals_BK.gather(1, by_col)
        order = vals_BK.argsort(dim=1, descending=True, stable=True)
        return vals_BK.gather(1, order), cols_BK.gather(1, order) + first_id
    # Otherwise take every entry above the k-th value plus the lowest-id entries equal to it.
    above = scores_BC > thr_B1
    equal = scores_BC == thr_B1
    need_B1 = k - above.sum(1, keepdim=True)
    take = above | (equal & (equal.cumsum(1) <= need_B1))
    cols = take.nonzero(as_tuple=True)[1].view(num_rows, k)  # row-major, ascending id within a row
    vals_BK = scores_BC.gather(1, cols)
    order = vals_BK.argsort(dim=1, descending=True, stable=True)
    return vals_BK.gather(1, order), cols.gather(1, order) + first_id


def _topk_core(
    chunks: Iterator[tuple[int, Tensor, bool]], num_rows: int, excl_rows: Tensor, excl_items: Tensor, k: int
) -> Tensor:
    best_vals: Tensor | None = None
    best_ids: Tensor | None = None
    for start, chunk_BC, is_view in chunks:
        stop = start + chunk_BC.shape[1]
        if is_view:
            chunk_BC = chunk_BC.clone()  # masked below; never write into the caller's scores
        _nan_to_neginf_(chunk_BC)
        if start == 0:
            chunk_BC[:, 0] = -math.inf
        in_chunk = (excl_items >= start) & (excl_items < stop)
        chunk_BC[excl_rows[in_chunk], excl_items[in_chunk] - start] = -math.inf
        take = k
        if best_vals is not None and best_vals.shape[1] == k and num_rows:
            # Only entries above a row's k-th score so far can enter (an equal one has a higher id
            # than the entry it ties with): as many per row as the row with most has, often none.
            take = min(k, int((chunk_BC > best_vals[:, -1:]).sum(1).max()))
            if take == 0:
                continue
        vals, ids = _best_k(chunk_BC, start, take)
        if best_vals is not None:
            # Merge 2K candidates by (score desc, id asc). Chunks come in ascending id order and each
            # part is already id-ascending among equal scores, so one stable sort by score suffices.
            vals, ids = torch.cat([best_vals, vals], 1), torch.cat([best_ids, ids], 1)
            order = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
            vals, ids = vals.gather(1, order), ids.gather(1, order)
        best_vals, best_ids = vals, ids
    assert best_vals is not None and best_ids is not None
    # Excluded items and padding carry -inf: report them as 0 ("no item") when fewer than k are eligible.
    best_ids = torch.where(torch.isneginf(best_vals), torch.zeros_like(best_ids), best_ids)
    if best_ids.shape[1] < k:
        best_ids = torch.cat([best_ids, best_ids.new_zeros(num_rows, k - best_ids.shape[1])], 1)
    return best_ids


def topk_items(
    scores: Tensor,
    exclude_values: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    k: int = 200,
    *,
    keep_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """Item ids [B, k] in rank order (score desc, ties by ascending id), padding and history excluded.

    ``keep_ids`` [B] (e.g. the targets) are never excluded, matching ``rank_of_targets``. Positions
    past the number of eligible items (or with -inf/NaN scores) hold 0.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    excl_rows, excl_items = _excluded_pairs(
        scores.shape[0], scores.shape[1], exclude_values, exclude_offsets, keep_ids, scores.device
    )
    return _topk_core(_matrix_chunks(scores, chunk_size), scores.shape[0], excl_rows, excl_items, k)


def topk_from_embeddings(
    query_BD: Tensor,
    item_emb_N1D: Tensor,
    exclude_values: Tensor | None = None,
    exclude_offsets: Tensor | None = None,
    k: int = 200,
    *,
    keep_ids: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK,
) -> Tensor:
    """``topk_items`` for dot-product scores, one item chunk at a time."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    num_rows, num_cols = query_BD.shape[0], item_emb_N1D.shape[0]
    excl_rows, excl_items = _excluded_pairs(
        num_rows, num_cols, exclude_values, exclude_offsets, keep_ids, query_BD.device
    )
    return _topk_core(
        _embedding_chunks(query_BD, item_emb_N1D, chunk_size), num_rows, excl_rows, excl_items, k
    )


# -------------------------------------------------------------------------------- accumulation


class RetrievalMetrics:
    """Accumulates per-user ranks over batches (and ranks of a process group) into HR/NDCG/MRR."""

    def __init__(self, ks_hr: Sequence[int] = (1, 10, 50, 200), ks_ndcg: Sequence[int] = (10, 50, 200)):
        self.ks_hr = tuple(ks_hr)
        self.ks_ndcg = tuple(ks_ndcg)
        self.reset()

    def reset(self) -> None:
        """Forget everything accumulated."""
        # [hr@k..., ndcg@k..., mrr, num_users] sums in float64 (exact counts up to 2**53 users).
        self._sums = torch.zeros(len(self.ks_hr) + len(self.ks_ndcg) + 2, dtype=torch.float64)

    def update(self, ranks: Tensor) -> None:
        """Add a batch of 0-based target ranks [B] (any device)."""
        ranks = ranks.detach().reshape(-1).to(torch.float64)
        if ranks.numel() and float(ranks.min()) < 0:
            raise ValueError("ranks must be >= 0 (0 = the target is ranked first)")
        parts = [(ranks < k).sum() for k in self.ks_hr]
        gain = 1.0 / torch.log2(ranks + 2.0)
        parts += [torch.where(ranks < k, gain, torch.zeros_like(gain)).sum() for k in self.ks_ndcg]
        parts += [(1.0 / (ranks + 1.0)).sum(), torch.tensor(float(ranks.numel()), dtype=torch.float64)]
        self._sums += torch.stack([p.to(torch.float64).cpu() for p in parts])

    def compute(self, group: dist.ProcessGroup | None = None, *, all_reduce: bool = True) -> dict[str, float]:
        """Metrics over everything accumulated, summed over ``group`` when torch.distributed is up.

        Then every rank of the group must call it (a collective); ``all_reduce=False`` gives this
        rank's numbers only. With no users the metrics are NaN and ``num_users`` is 0.
        """
        sums = self._sums.clone()
        if all_reduce and dist.is_available() and dist.is_initialized():
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            reduced = sums.to(device)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
            sums = reduced.cpu()
        values = sums.tolist()
        num_users = values[-1]
        names = [f"hr@{k}" for k in self.ks_hr] + [f"ndcg@{k}" for k in self.ks_ndcg] + ["mrr"]
        out: dict[str, float] = {
            name: (v / num_users if num_users else math.nan) for name, v in zip(names, values)
        }
        out["num_users"] = int(num_users)
        return out


# ---------------------------------------------------------------------------------- popularity


def item_counts(item_ids: Tensor | np.ndarray, num_items: int) -> Tensor:
    """Interaction count per item id [num_items + 1] (index 0 = padding, count ignored)."""
    ids = torch.as_tensor(np.asarray(item_ids), dtype=torch.long).reshape(-1)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > num_items):
        raise ValueError(f"item ids must be in 0..{num_items}; got {int(ids.min())}..{int(ids.max())}")
    counts = torch.bincount(ids, minlength=num_items + 1)
    counts[0] = 0
    return counts


def popularity_ranks(
    train_item_counts: Tensor,
    target_ids: Tensor,
    exclude_values: Tensor | None,
    exclude_offsets: Tensor | None,
    *,
    sorted_counts: Tensor | None = None,
) -> Tensor:
    """Ranks [B] of the popularity recommender (score = train count), same protocol and tie policy.

    Equivalent to ``rank_of_targets(counts.expand(B, -1), ...)`` but O(B log N + T) with no matrix:
    rank = #items with count >= the target's, minus the target, minus excluded history items that
    also have count >= the target's. Over many batches, pass ``train_item_counts`` as float64 and
    ``sorted_counts`` = ``counts[1:].sort().values`` once: the sort is O(N log N), seconds at 10^7 items.
    """
    counts = train_item_counts.to(torch.float64).cpu()  # only read below: no copy when already float64
    num_cols = counts.shape[0]
    _check_targets(target_ids, num_cols)
    target_ids = target_ids.cpu().long()
    if sorted_counts is None:
        sorted_counts = counts[1:].sort().values  # padding is never a candidate
    t_B = counts[target_ids]
    # items with count >= t  =  N - #items with count < t
    rank_B = (num_cols - 1) - torch.searchsorted(sorted_counts, t_B, right=False) - 1
    excl_rows, excl_items = _excluded_pairs(
        target_ids.shape[0], num_cols, exclude_values, exclude_offsets, target_ids, torch.device("cpu")
    )
    hit = (counts[excl_items] >= t_B[excl_rows]).long()
    rank_B.index_add_(0, excl_rows, -hit)
    return rank_B


def popularity_baseline(
    train_item_counts: Tensor,
    target_ids: Tensor,
    exclude_values: Tensor | None,
    exclude_offsets: Tensor | None,
    ks_hr: Sequence[int] = (1, 10, 50, 200),
    ks_ndcg: Sequence[int] = (10, 50, 200),
) -> dict[str, float]:
    """Metrics of the most-popular recommender on eval rows (history excluded, pessimistic ties).

    ``train_item_counts`` [num_items+1] should come from the train split only (``item_counts``);
    targets and histories from the eval rows (``train.batch.split_last``). Local, not a collective:
    it is cheap enough for rank 0 to run on the whole split (``evaluate_popularity``).
    """
    metrics = RetrievalMetrics(ks_hr, ks_ndcg)
    metrics.update(popularity_ranks(train_item_counts, target_ids, exclude_values, exclude_offsets))
    return metrics.compute(all_reduce=False)
