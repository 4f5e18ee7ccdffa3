"""Token-budget batching: batches cut by tokens and attention cost, length-bucketed, balanced over ranks.

A fixed number of rows per rank gives each rank a different amount of work when the rows' lengths
vary (HSTU's attention costs ~ sum of l^2), and a rank whose batch is light waits for the heaviest
one at every collective. Here a *global batch* is cut for all ranks at once and divided among them:

1. Windows. The epoch's permuted row groups (``units``) are taken ``window_units`` at a time; the
   rows of a window are shuffled with ``(seed, epoch, window)`` and sorted by length times a random
   factor in [1, 1 + length_jitter), so rows of similar length land in the same batch (bucketing,
   padding stays small) while the batches' composition still changes from epoch to epoch.
2. Cuts. Walking the sorted rows, a global batch closes when the next row would take it past
   ``world_size * max_tokens`` tokens or ``world_size * max_cost`` attention cost (sum of l^2).
3. Balance. The rows of a global batch are split into ``world_size`` parts with the
   Karmarkar-Karp largest differencing method on each row's attention cost (as NVIDIA's recsys
   examples' balanced shuffler does), so the most loaded rank carries close to the mean. A part
   over a per-rank budget sends the batch's shortest row on to the next batch, and it is split
   again.
4. Order. The window's batches are shuffled with ``(seed, epoch, window)``; windows keep the
   permuted unit order.

Every rank computes the same plan from the row lengths alone, and each rank takes its own part
of every global batch, so all ranks have exactly the same number of batches and every row is
in exactly one part once per epoch. The plan depends only on (lengths, seed, epoch, world_size,
budgets), not on the number of DataLoader workers: windows are dealt to workers round-robin
(window i to worker i % W), and ``round_robin_position`` finds where a resumed epoch continues.

All functions here are pure (numpy in, lists out); ``train/reader.py`` does the reading.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def attention_cost(lengths: np.ndarray) -> int:
    """Sum of l^2: the attention work (and the size of its saved tensors) of rows of these lengths."""
    lengths = np.asarray(lengths, dtype=np.int64)
    return int((lengths * lengths).sum())


def karmarkar_karp(weights: Sequence[int], num_parts: int) -> list[list[int]]:
    """Split item indices into ``num_parts`` lists with near-equal weight sums (largest differencing).

    Each item starts as a partial partition with the item in one part and the others empty. The two
    partial partitions with the largest spread (max - min part) are repeatedly merged so that the
    heaviest part of one joins the lightest of the other; the last one left is the answer. Ties are
    broken by a counter, so the result is deterministic.
    """
    if num_parts < 1:
        raise ValueError(f"num_parts must be >= 1, got {num_parts}")
    heap: list[tuple[int, int, list[tuple[int, list[int]]]]] = []
    for i, w in enumerate(weights):
        parts = [(int(w), [i])] + [(0, []) for _ in range(num_parts - 1)]
        heap.append((-int(w), i, parts))
    if not heap:
        return [[] for _ in range(num_parts)]
    heapq.heapify(heap)
    counter = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        a = sorted(a, key=lambda p: -p[0])  # heaviest first
        b = sorted(b, key=lambda p: p[0])  # lightest first
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, b)]
        spread = max(s for s, _ in merged) - min(s for s, _ in merged)
        heapq.heappush(heap, (-spread, counter, merged))
        counter += 1
    return [sorted(items) for _, items in sorted(heap[0][2], key=lambda p: -p[0])]


def _fits(lengths: np.ndarray, parts: list[list[int]], max_tokens: int, max_cost: int | None) -> bool:
    for part in parts:
        ls = lengths[part]
        if int(ls.sum()) > max_tokens or (max_cost is not None and attention_cost(ls) > max_cost):
            return False
    return True


def _split(
    lengths: np.ndarray, num_parts: int, max_tokens: int, max_cost: int | None
) -> list[list[int]] | None:
    """Balanced parts of ``lengths`` (indices) within the per-rank budgets, or None."""
    costs = (lengths.astype(np.int64) ** 2).tolist()
    parts = karmarkar_karp(costs, num_parts)
    if all(parts) and _fits(lengths, parts, max_tokens, max_cost):
        return parts
    if len(lengths) <= 2 * num_parts:
        # Pair the longest with the shortest: at most two rows per part, which the budget check in
        # check_budgets guarantees to fit; no part is empty when there are >= num_parts rows.
        order = np.argsort(-lengths, kind="stable").tolist()
        parts = [[order[i]] for i in range(min(num_parts, len(order)))]
        for j, idx in enumerate(order[num_parts:]):
            parts[num_parts - 1 - j].append(idx)
        parts = [sorted(p) for p in parts]
        if len(parts) == num_parts and _fits(lengths, parts, max_tokens, max_cost):
            return parts
    return None


def check_budgets(max_row_len: int, max_tokens: int, max_cost: int | None) -> None:
    """Budgets must hold two of the longest rows (so the end of a window can always be placed)."""
    if max_tokens < 2 * max_row_len:
        raise ValueError(
            f"max_tokens_per_rank={max_tokens} must be at least twice the longest row ({max_row_len} items); "
            f"raise it to >= {2 * max_row_len}"
        )
    if max_cost is not None and max_cost < 2 * max_row_len**2:
        raise ValueError(
            f"max_attention_cost_per_rank={max_cost} must be at least twice the longest row's l^2 "
            f"({max_row_len}^2); raise it to >= {2 * max_row_len**2}"
        )


def cut_window(
    lengths: np.ndarray, world_size: int, max_tokens: int, max_cost: int | None
) -> list[list[list[int]]]:
    """Global batches of one window, each a list of ``world_size`` parts (indices into ``lengths``).

    Rows are taken in the given order (the caller sorts them by length); every index appears in
    exactly one part; every part is non-empty and within the budgets. Needs >= world_size rows.
    """
    n = len(lengths)
    if n < world_size:
        raise ValueError(f"a window of {n} rows cannot feed {world_size} ranks")
    cum_tokens = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    cum_cost = np.concatenate([[0], np.cumsum(lengths.astype(np.int64) ** 2)])
    out: list[list[list[int]]] = []
    start = 0
    while start < n:
        # Largest stop within the global budgets (one search per batch), at least one row per rank.
        stop = int(np.searchsorted(cum_tokens, cum_tokens[start] + world_size * max_tokens, side="right")) - 1
        if max_cost is not None:
            stop = min(
                stop, int(np.searchsorted(cum_cost, cum_cost[start] + world_size * max_cost, "right")) - 1
            )
        stop = min(n, max(stop, start + world_size))
        if 0 < n - stop < world_size:
            stop = n  # a tail too short for every rank joins this batch (split in two below if needed)
        while True:
            parts = _split(lengths[start:stop], world_size, max_tokens, max_cost)
            if parts is not None or stop - start <= world_size:
                break
            stop -= 1  # a part is over budget: the shortest row waits for the next batch
            if 0 < n - stop < world_size:  # but never leave a tail that cannot feed every rank
                half = start + (stop - start) // 2
                if half - start >= world_size:
                    stop = half
        if parts is None:
            raise AssertionError(
                f"no split of {stop - start} rows within the budgets (check_budgets admits them)"
            )
        out.append([[start + i for i in part] for part in parts])
        start = stop
    return out


@dataclass(frozen=True)
class GlobalBatch:
    """One step for all ranks: ``parts[r]`` are rank r's rows, as indices into the window's row list."""

    window: int
    parts: tuple[tuple[int, ...], ...]


def plan_epoch(
    window_lengths: list[np.ndarray],
    world_size: int,
    max_tokens: int,
    max_cost: int | None,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    length_jitter: float = 0.1,
) -> list[list[GlobalBatch]]:
    """Per window, its global batches in order (see the module docstring).

    ``window_lengths[w]`` are the lengths of window w's rows in their stored order; a batch's
    ``parts`` index into that order. Windows with fewer than ``world_size`` rows must have been
    merged by the caller (``group_units``).
    """
    plan: list[list[GlobalBatch]] = []
    for w, lengths in enumerate(window_lengths):
        lengths = np.asarray(lengths, dtype=np.int64)
        rng = np.random.default_rng([seed, epoch, w, 7])
        order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
        key = lengths[order].astype(np.float64)
        if shuffle and length_jitter > 0:
            # Jitter the sort key so that neighbouring lengths mix differently every epoch (a plain
            # sort would put the same rows together in every epoch).
            key = key * (1.0 + length_jitter * rng.random(len(key)))
        order = order[np.argsort(-key, kind="stable")]  # bucket: longest first
        batches = cut_window(lengths[order], world_size, max_tokens, max_cost)
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        plan.append(
            [
                GlobalBatch(w, tuple(tuple(int(order[i]) for i in sorted(part)) for part in parts))
                for parts in batches
            ]
        )
    return plan


def group_units(unit_rows: list[int], window_units: int, world_size: int) -> list[list[int]]:
    """Positions of consecutive units taken ``window_units`` at a time; a window with fewer than
    ``world_size`` rows joins its neighbour (the last one joins the one before)."""
    windows: list[list[int]] = []
    current: list[int] = []
    for i in range(len(unit_rows)):
        current.append(i)
        if len(current) >= window_units and sum(unit_rows[j] for j in current) >= world_size:
            windows.append(current)
            current = []
    if current:
        if windows and sum(unit_rows[j] for j in current) < world_size:
            windows[-1] += current
        else:
            windows.append(current)
    if sum(unit_rows) < world_size:
        raise ValueError(f"{sum(unit_rows)} rows cannot feed {world_size} ranks")
    return windows


def round_robin_position(counts: list[int], consumed: int) -> tuple[int, list[int]]:
    """Where a DataLoader that deals round-robin over workers with ``counts`` batches stands after
    ``consumed`` batches: (rotation, batches consumed per worker).

    The DataLoader yields (round j, worker w) in order of j then w, skipping workers that have run
    out. A fresh DataLoader starts at worker 0, so resumed worker i plays original worker
    ``(i + rotation) % W`` and skips that worker's consumed batches; the rest comes in the original
    order.
    """
    total = sum(counts)
    if not 0 <= consumed <= total:
        raise ValueError(f"batches_consumed={consumed} is outside [0, {total}] for this epoch's plan")
    num = len(counts)
    done = [0] * num
    remaining, rnd = consumed, 0
    while True:
        active = [w for w in range(num) if counts[w] > rnd]
        if not active or remaining < len(active):
            if not active:
                return 0, list(counts)
            s = active[remaining]
            for w in range(num):
                done[w] = min(counts[w], rnd + int(w < s))
            return s, done
        remaining -= len(active)
        rnd += 1


def balance_stats(per_step_costs: list[list[int]]) -> dict[str, float]:
    """Mean over steps of max/mean of the ranks' costs (1.0 = perfectly balanced), and its worst step."""
    ratios = [max(c) / (sum(c) / len(c)) for c in per_step_costs if sum(c) > 0]
    return {"mean_max_over_mean": float(np.mean(ratios)), "worst_max_over_mean": float(np.max(ratios))}
