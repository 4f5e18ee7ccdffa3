"""The jagged batch the trainer consumes, and its vectorised collation from Arrow.

A ``SequenceBatch`` holds B user rows of different lengths as one flat ``item_ids`` tensor plus
``lengths``/``offsets`` (row ``i`` is ``item_ids[offsets[i]:offsets[i + 1]]``), which maps directly
onto a TorchRec ``KeyedJaggedTensor`` (values + lengths) and onto HSTU's ``seq_offsets``. Rows are
the stored rows of docs/data_format.md unchanged: the trainer decides what is input and what is target
(``split_last`` does the usual valid/test split: last item = target; ``split_inputs_targets`` cuts
rows into next-item inputs and targets).

Collation never loops over rows in Python: it reads the Arrow list offsets and the flat values buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

__all__ = [
    "ModelInputs", "SequenceBatch", "collate_rows", "jagged_concat", "jagged_select_rows",
    "split_inputs_targets", "split_last",
]  # fmt: skip


@dataclass
class SequenceBatch:
    """B user sequences, jagged. T = total number of items in the batch (``offsets[-1]``)."""

    user_ids: Tensor  # [B] int64 dense user ids
    item_ids: Tensor  # [T] int64 dense item ids, rows concatenated, each row oldest first
    lengths: Tensor  # [B] int64
    offsets: Tensor  # [B+1] int64, offsets[0] == 0, offsets[i+1] - offsets[i] == lengths[i]
    timestamps: Tensor | None  # [T] int64 seconds, or None when the data has no timestamps

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SequenceBatch:
        """A copy with every tensor on ``device``."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return SequenceBatch(
            user_ids=move(self.user_ids),
            item_ids=move(self.item_ids),
            lengths=move(self.lengths),
            offsets=move(self.offsets),
            timestamps=move(self.timestamps),
        )

    def pin_memory(self) -> SequenceBatch:
        """Pinned copy; ``DataLoader(pin_memory=True)`` calls this on custom batch types."""
        return SequenceBatch(
            user_ids=self.user_ids.pin_memory(),
            item_ids=self.item_ids.pin_memory(),
            lengths=self.lengths.pin_memory(),
            offsets=self.offsets.pin_memory(),
            timestamps=None if self.timestamps is None else self.timestamps.pin_memory(),
        )

    @property
    def num_rows(self) -> int:
        """Number of user rows B."""
        return int(self.user_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        """Total number of items T over all rows."""
        return int(self.item_ids.shape[0])

    @property
    def max_len(self) -> int:
        """Length of the longest row (0 for an empty batch)."""
        return int(self.lengths.max()) if self.num_rows > 0 else 0


def _list_column(table: pa.Table | pa.RecordBatch, name: str) -> pa.ListArray | None:
    """Column ``name`` as one contiguous list<int64> array, or None when absent."""
    if name not in table.column_names:
        return None
    column = table.column(name)
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if pa.types.is_large_list(column.type) or pa.types.is_fixed_size_list(column.type):
        column = column.cast(pa.list_(column.type.value_type))
    if not pa.types.is_list(column.type):
        raise ValueError(
            f"column '{name}' has type {column.type}, expected list<int64> (see docs/data_format.md)"
        )
    return column


def _offsets_and_values(column: pa.ListArray) -> tuple[np.ndarray, np.ndarray]:
    """Zero-based int64 offsets [B+1] and the flat int64 values [T] of a (possibly sliced) list array."""
    # ``offsets`` honours a slice but still indexes the parent's values buffer; ``flatten`` honours it too.
    offsets = column.offsets.to_numpy().astype(np.int64)  # a copy: shifted in place below
    offsets -= offsets[0]
    values = column.flatten()
    if values.type != pa.int64():
        values = values.cast(pa.int64())
    values_np = values.to_numpy(zero_copy_only=False)
    return offsets, values_np


def collate_rows(table: pa.Table | pa.RecordBatch) -> SequenceBatch:
    """Rows with the docs/data_format.md schema -> one jagged ``SequenceBatch`` (no per-row Python).

    ``timestamps`` becomes None when the column is absent or null in every row; a column that is
    null in only some rows, or whose row lengths differ from ``item_ids``, is an error.
    """
    items = _list_column(table, "item_ids")
    if items is None or "user_id" not in table.column_names:
        raise ValueError(
            f"rows need columns 'user_id' and 'item_ids' (see docs/data_format.md); got {table.column_names}"
        )
    if items.null_count:
        raise ValueError(
            f"{items.null_count} row(s) have a null 'item_ids'; the prepare job never writes that"
        )
    offsets, values = _offsets_and_values(items)

    user_col = table.column("user_id")
    user_ids = np.asarray(user_col.to_numpy(), dtype=np.int64) if len(table) else np.zeros(0, np.int64)

    ts_values = None
    ts = _list_column(table, "timestamps")
    if ts is not None and ts.null_count < len(ts):
        if ts.null_count:
            raise ValueError(
                f"'timestamps' is null in {ts.null_count} of {len(ts)} rows; it must be null in all rows or none"
            )
        ts_offsets, ts_values = _offsets_and_values(ts)
        if not np.array_equal(ts_offsets, offsets):
            bad = int(np.flatnonzero(np.diff(ts_offsets) != np.diff(offsets))[0])
            raise ValueError(
                f"row {bad} (user_id {int(user_ids[bad])}): 'timestamps' and 'item_ids' differ in length"
            )

    # All five tensors are views of one int64 buffer: a DataLoader worker then ships one shared-memory
    # block per batch instead of five (about 1 ms each), and Arrow's read-only buffers are copied once.
    num_rows, num_tokens = len(user_ids), len(values)
    sizes = [num_rows, num_tokens, num_rows, num_rows + 1, num_tokens if ts_values is not None else 0]
    buffer = torch.empty(sum(sizes), dtype=torch.int64)
    user_t, items_t, lengths_t, offsets_t, ts_t = torch.split(buffer, sizes)
    user_t.numpy()[:] = user_ids
    items_t.numpy()[:] = values
    offsets_t.numpy()[:] = offsets
    torch.sub(offsets_t[1:], offsets_t[:-1], out=lengths_t)
    if ts_values is not None:
        ts_t.numpy()[:] = ts_values
    return SequenceBatch(
        user_ids=user_t,
        item_ids=items_t,
        lengths=lengths_t,
        offsets=offsets_t,
        timestamps=ts_t if ts_values is not None else None,
    )


def split_last(batch: SequenceBatch) -> tuple[SequenceBatch, Tensor]:
    """Valid/test rows -> (history batch without each row's last item, target ids [B]).

    docs/data_format.md: the last element of a valid or test row is its target. Every row must have
    at least one item; a row of length 1 gets an empty history.
    """
    if batch.num_rows and int(batch.lengths.min()) < 1:
        raise ValueError("split_last needs every row to hold at least one item (its target)")
    last = batch.offsets[1:] - 1  # [B] position of each row's target
    targets = batch.item_ids[last]
    keep = torch.ones(batch.num_tokens, dtype=torch.bool, device=batch.item_ids.device)
    keep[last] = False
    lengths = batch.lengths - 1
    offsets = torch.zeros_like(batch.offsets)
    torch.cumsum(lengths, 0, out=offsets[1:])
    history = SequenceBatch(
        user_ids=batch.user_ids,
        item_ids=batch.item_ids[keep],
        lengths=lengths,
        offsets=offsets,
        timestamps=None if batch.timestamps is None else batch.timestamps[keep],
    )
    return history, targets


class ModelInputs(NamedTuple):
    """One batch cut into what the encoder and the loss take (``split_inputs_targets``)."""

    input_ids: Tensor  # [T] the jagged inputs
    offsets: Tensor  # [B+1] row boundaries of input_ids
    timestamps: Tensor | None  # [T] each input's time
    target_timestamps: Tensor | None  # [T] the time of the item after each input (even if last_only)
    targets: Tensor  # [T] the next item of each input, or [B] each row's last item (last_only)
    keep_rows: Tensor  # [rows of the batch] bool: the rows kept (those with at least 2 items)

    def times_on(self, device: torch.device) -> tuple[Tensor | None, Tensor | None]:
        """``(timestamps, target_timestamps)`` on ``device``; None stays None (data without times)."""
        return tuple(None if t is None else t.to(device) for t in (self.timestamps, self.target_timestamps))


def split_inputs_targets(batch: SequenceBatch, max_seq_len: int, last_only: bool) -> ModelInputs:
    """Cut stored rows into model inputs and targets (docs/data_format.md).

    Rows are first cut to their most recent ``max_seq_len + 1`` items. Inputs are each row without
    its last item; targets are each row without its first (``last_only``: only the last item, for
    eval). Rows with fewer than 2 items are dropped.
    """
    lengths = batch.lengths
    keep_rows = lengths >= 2
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    pos = torch.arange(len(batch.item_ids)) - batch.offsets[:-1][row_of]
    cut = torch.clamp(lengths - (max_seq_len + 1), min=0)
    keep = (pos >= cut[row_of]) & keep_rows[row_of]
    last = pos == (lengths - 1)[row_of]
    after_first = keep & ~(pos == cut[row_of])  # each kept row without its first item
    in_mask = keep & ~last
    input_ids = batch.item_ids[in_mask]
    in_lengths = (torch.minimum(lengths, torch.full_like(lengths, max_seq_len + 1)) - 1).clamp(min=0)
    in_lengths = in_lengths[keep_rows]
    offsets = torch.zeros(len(in_lengths) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(in_lengths, 0)
    ts = target_ts = None
    if batch.timestamps is not None:
        ts, target_ts = batch.timestamps[in_mask], batch.timestamps[after_first]
    targets = batch.item_ids[keep & last] if last_only else batch.item_ids[after_first]
    return ModelInputs(input_ids, offsets, ts, target_ts, targets, keep_rows)


def jagged_select_rows(values: Tensor, offsets: Tensor, keep_rows: Tensor) -> tuple[Tensor, Tensor]:
    """The rows of a jagged ``(values [T], offsets [B+1])`` where ``keep_rows`` [B] is True."""
    lengths = offsets[1:] - offsets[:-1]
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    kept = lengths[keep_rows]
    out_offsets = torch.zeros(len(kept) + 1, dtype=torch.long)
    torch.cumsum(kept, 0, out=out_offsets[1:])
    return values[keep_rows[row_of]], out_offsets


def jagged_concat(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Row-wise concatenation of two jagged ``(values, offsets)`` with the same rows: row i is a_i + b_i."""
    (a_values, a_offsets), (b_values, b_offsets) = a, b
    a_len, b_len = a_offsets[1:] - a_offsets[:-1], b_offsets[1:] - b_offsets[:-1]
    offsets = torch.zeros(len(a_len) + 1, dtype=torch.long)
    torch.cumsum(a_len + b_len, 0, out=offsets[1:])
    # Position of every element in the output: its row's start, plus (for b) the row's a-length.
    a_row = torch.repeat_interleave(torch.arange(len(a_len)), a_len)
    b_row = torch.repeat_interleave(torch.arange(len(b_len)), b_len)
    values = torch.empty(int(offsets[-1]), dtype=torch.long)
    values[offsets[a_row] + torch.arange(len(a_values)) - a_offsets[a_row]] = a_values.long()
    values[offsets[b_row] + a_len[b_row] + torch.arange(len(b_values)) - b_offsets[b_row]] = b_values.long()
    return values, offsets
