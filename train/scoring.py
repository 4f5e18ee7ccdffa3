"""Exact retrieval over all items when each rank holds only a part of the item table.

Evaluation ranks every item for each user. Gathering the table on every rank costs O(items) memory
per rank; instead (``eval.scoring=sharded``) each rank holds a contiguous range of item rows (its
*slice*), scores every rank's queries against it, and the per-rank results are merged:

- the target's rank (pessimistic ties, ``train/metrics.py``) is a sum of per-slice counts of eligible
  items scoring >= the target, so one ``all_reduce`` of B integers gives the exact global rank;
- the top-k list (score desc, ties by ascending id) is the top-k of the union of per-slice top-k
  lists: each slice's list is exact for its ids, and the slices are in ascending id order.

Exactness needs every (query, item) score to be the same bits whichever rank computes it and
whatever slice the item sits in. CPU BLAS does not promise that: MKL's sgemm gives different last bits
for the same row and column depending on the matrix shape and where the slice starts (measured: 29 of
150 sub-slices differed by up to 1e-6). So scores are computed in *canonical blocks*: item block b
always covers global ids ``[b * ITEM_BLOCK, (b + 1) * ITEM_BLOCK)`` at fixed positions (rows outside
the slice are zeros), queries in blocks of ``QUERY_BLOCK`` rows at fixed positions, and every product
has the same shape ``[QUERY_BLOCK, D] x [D, ITEM_BLOCK]``. The gathered path (``eval.scoring=
gathered``) uses the same blocks over the whole table, so both paths give identical scores, ranks and
lists; what differs is only where the rows live and how results are combined.

Shapes: B = queries, D = embedding dim, S = rows in a slice, C = items in a block, K = top-k.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

from train.metrics import _best_k, _excluded_pairs, _nan_to_neginf_, _rank_core

ITEM_BLOCK = 4096
QUERY_BLOCK = 32
_ALIGN_BYTES = 64  # a block taken as a view of the slice must start where a fresh allocation would


def _padded_queries(query_BD: Tensor) -> Tensor:
    """The queries in a fresh zero-padded buffer of a multiple of QUERY_BLOCK rows."""
    num_rows = query_BD.shape[0]
    padded = query_BD.new_zeros(-(-max(num_rows, 1) // QUERY_BLOCK) * QUERY_BLOCK, query_BD.shape[1])
    padded[:num_rows] = query_BD
    return padded


def _item_block(rows_SD: Tensor, first_id: int, block: int) -> tuple[Tensor, int, int]:
    """Block ``block`` as a [ITEM_BLOCK, D] tensor with the slice's rows at their canonical positions,
    and the column range ``[lo, hi)`` of the block the slice fills."""
    start = block * ITEM_BLOCK
    lo = max(start, first_id) - start
    hi = min(start + ITEM_BLOCK, first_id + rows_SD.shape[0]) - start
    part = rows_SD[start + lo - first_id : start + hi - first_id]
    if lo == 0 and hi == ITEM_BLOCK and part.is_contiguous() and part.data_ptr() % _ALIGN_BYTES == 0:
        return part, lo, hi
    full = rows_SD.new_zeros(ITEM_BLOCK, rows_SD.shape[1])
    full[lo:hi] = part
    return full, lo, hi


def _block_range(first_id: int, num_rows: int) -> range:
    if num_rows == 0:
        return range(0)
    return range(first_id // ITEM_BLOCK, (first_id + num_rows - 1) // ITEM_BLOCK + 1)


def slice_score_chunks(
    query_BD: Tensor, rows_SD: Tensor, first_id: int
) -> Iterator[tuple[int, Tensor, bool]]:
    """Scores ``[B, C]`` of the queries against the slice, one canonical block at a time, as
    ``(first global id of the chunk, scores, False)``: the chunk source of ``train/metrics.py``."""
    num_rows = query_BD.shape[0]
    queries = _padded_queries(query_BD)
    for block in _block_range(first_id, rows_SD.shape[0]):
        items_CD, lo, hi = _item_block(rows_SD, first_id, block)
        parts = [queries[q : q + QUERY_BLOCK] @ items_CD.T for q in range(0, len(queries), QUERY_BLOCK)]
        scores = torch.cat(parts)[:num_rows, lo:hi].float()
        yield block * ITEM_BLOCK + lo, scores, False


def slice_target_scores(
    query_BD: Tensor, rows_SD: Tensor, first_id: int, target_ids: Tensor
) -> tuple[Tensor, Tensor]:
    """``(owned [B] bool, scores [B])``: each target held by the slice, scored by its canonical block
    (the same bits as its entry in ``slice_score_chunks``); 0 where the slice does not hold it."""
    owned = (target_ids >= first_id) & (target_ids < first_id + rows_SD.shape[0])
    scores = torch.zeros(len(target_ids), dtype=torch.float32, device=query_BD.device)
    if not bool(owned.any()):
        return owned, scores
    rows = owned.nonzero(as_tuple=True)[0]
    blocks = target_ids[rows] // ITEM_BLOCK
    queries = _padded_queries(query_BD)
    for block in torch.unique(blocks).tolist():
        items_CD, _, _ = _item_block(rows_SD, first_id, block)
        in_block = rows[blocks == block]
        for q in torch.unique(in_block // QUERY_BLOCK).tolist():
            s = q * QUERY_BLOCK
            block_scores = queries[s : s + QUERY_BLOCK] @ items_CD.T
            r = in_block[(in_block >= s) & (in_block < s + QUERY_BLOCK)]
            scores[r] = block_scores[r - s, target_ids[r] - block * ITEM_BLOCK].float()
    return owned, scores


def slice_rank_counts(
    query_BD: Tensor,
    rows_SD: Tensor,
    first_id: int,
    target_scores_B: Tensor,
    target_ids: Tensor,
    excl_rows: Tensor,
    excl_items: Tensor,
) -> Tensor:
    """Per query, the eligible items of the slice (not padding, not excluded, not the target) whose
    score is >= the target's: summed over a partition of the table, the pessimistic rank."""
    chunks = slice_score_chunks(query_BD, rows_SD, first_id)
    return _rank_core(chunks, 0, target_scores_B, target_ids, excl_rows, excl_items, fix_worst=False)


def worst_rank_fix(ranks_B: Tensor, target_scores_B: Tensor, num_items: int, excl_rows: Tensor) -> Tensor:
    """A NaN or -inf target ties with (or trails) every eligible item: the worst rank, as metrics does."""
    worst = torch.isnan(target_scores_B) | torch.isneginf(target_scores_B)
    if not bool(worst.any()):
        return ranks_B
    num_excluded = torch.bincount(excl_rows, minlength=len(ranks_B))
    return torch.where(worst, (num_items - 1) - num_excluded, ranks_B)


def slice_topk(
    query_BD: Tensor, rows_SD: Tensor, first_id: int, excl_rows: Tensor, excl_items: Tensor, k: int
) -> tuple[Tensor, Tensor]:
    """``(scores [B, K], ids [B, K])``: the slice's k best (score desc, id asc), padding and excluded
    items at -inf; -inf past the slice's size."""
    num_rows = query_BD.shape[0]
    best_vals = torch.full((num_rows, k), -math.inf, device=query_BD.device)
    best_ids = torch.zeros(num_rows, k, dtype=torch.long, device=query_BD.device)
    for start, chunk_BC, _ in slice_score_chunks(query_BD, rows_SD, first_id):
        stop = start + chunk_BC.shape[1]
        _nan_to_neginf_(chunk_BC)
        if start == 0:
            chunk_BC[:, 0] = -math.inf
        in_chunk = (excl_items >= start) & (excl_items < stop)
        chunk_BC[excl_rows[in_chunk], excl_items[in_chunk] - start] = -math.inf
        # Only entries above a row's current k-th score can enter its list (an equal one has a higher
        # id than the entry it ties with, so it loses). Once the lists fill, most chunks have none,
        # or a few: take as many per row as the row with most has (its exact best), not k.
        need = int((chunk_BC > best_vals[:, -1:]).sum(1).max()) if num_rows else 0
        if need == 0:
            continue
        vals, ids = _best_k(chunk_BC, start, min(k, need))
        # Earlier chunks hold lower ids: one stable sort by score keeps ties in ascending id order.
        vals, ids = torch.cat([best_vals, vals], 1), torch.cat([best_ids, ids], 1)
        order = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
        best_vals, best_ids = vals.gather(1, order), ids.gather(1, order)
    return best_vals, best_ids


def merge_topk(vals_list: list[Tensor], ids_list: list[Tensor], k: int) -> Tensor:
    """Ids [B, K] of the best k over per-slice lists given in ascending id order of their slices;
    positions holding -inf (fewer than k eligible items) become 0, as in ``metrics.topk_items``."""
    vals, ids = torch.cat(vals_list, 1), torch.cat(ids_list, 1)
    order = vals.argsort(dim=1, descending=True, stable=True)[:, :k]
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    return torch.where(torch.isneginf(vals), torch.zeros_like(ids), ids)


def score_slice(
    query_BD: Tensor,
    rows_SD: Tensor,
    first_id: int,
    num_items: int,
    target_ids: Tensor,
    exclude_values: Tensor,
    exclude_offsets: Tensor,
    top_k: int | None,
    group_reduce: bool,
) -> tuple[Tensor, Tensor | None]:
    """Ranks [B] (and top-k ids [B, K]) of the queries over the whole catalogue.

    ``group_reduce=False``: the slice is the whole table (ids 0..num_items), nothing is exchanged.
    ``group_reduce=True``: the slices of the ranks partition the table in rank order; every rank calls
    this with the same queries, targets and exclusions (a collective), and every rank gets the result.
    """
    num_cols = num_items + 1
    device = query_BD.device
    excl_rows, excl_items = _excluded_pairs(
        len(target_ids), num_cols, exclude_values, exclude_offsets, target_ids, device
    )
    owned, target_scores = slice_target_scores(query_BD, rows_SD, first_id, target_ids)
    if group_reduce:
        # One owner per target; the others add 0 (x + 0 is exact, NaN and -inf survive it).
        dist.all_reduce(target_scores)
    counts = slice_rank_counts(query_BD, rows_SD, first_id, target_scores, target_ids, excl_rows, excl_items)
    if group_reduce:
        dist.all_reduce(counts)
    ranks = worst_rank_fix(counts, target_scores, num_items, excl_rows)
    if top_k is None:
        return ranks, None
    k = min(top_k, num_items)
    vals, ids = slice_topk(query_BD, rows_SD, first_id, excl_rows, excl_items, k)
    if not group_reduce:
        return ranks, merge_topk([vals], [ids], k)
    world = dist.get_world_size()
    all_vals = [torch.empty_like(vals) for _ in range(world)]
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    dist.all_gather(all_vals, vals)
    dist.all_gather(all_ids, ids)
    return ranks, merge_topk(all_vals, all_ids, k)
