"""Read prepared sequence shards (docs/data_format.md) into jagged batches, sharded over ranks and workers.

The trainer reads Parquet with pyarrow only (no Ray). ``SequenceDataset`` is an ``IterableDataset``
that yields whole ``SequenceBatch`` es; wrap it with ``dataset.loader()`` (a ``DataLoader`` with
``batch_size=None``) so every DataLoader worker produces full batches.

Work units are the (file, row group) pairs of the split (or of several splits read as one stream,
e.g. the trainer's ``train`` + ``older``), listed from the manifest and the Parquet footers. Every
epoch the unit list is permuted with ``(seed, epoch)`` (identically on every rank), and the units
are divided among the ``world_size * num_workers`` *global workers* (``g = rank * num_workers +
worker_id``) in one of two ways:

``partition="rows"`` (default)
    Worker g takes the contiguous row range ``[g*N//G, (g+1)*N//G)`` of the permuted unit stream,
    so workers differ by at most one row and ranks by at most ``num_workers`` batches (each worker's
    last batch may be short), which the trainer needs because embedding lookups are collective
    (it all-reduces ``num_batches_for_rank()`` with MIN). A worker reads only its range,
    plus at most two row groups it shares with its neighbours (read whole and sliced).
    (This replaces the "keep rows with index % G == g" striding of the design brief: it is exactly as
    balanced, but a worker reads ~1/G of the data instead of all of it.)
``partition="strided"``
    Every worker reads the whole (identically shuffled) stream and keeps rows ``g, g+G, g+2G, ...``.
    With ``batch_size`` = global batch / world size (and no DataLoader workers), the rows of global
    batch k are the same whatever the world size: the trainer's sharded-vs-single-process
    equivalence relies on it. Each worker reads all the data (G times the I/O), and ``max_tokens``
    is not supported.
``partition="row_groups"``
    Unit i of the permuted list goes to global worker ``i % G``. No row group is read twice, but
    workers differ by up to one row group of rows, and workers beyond the number of units get
    nothing: only for data with many more row groups than workers.

Within a worker, rows are shuffled in blocks of ``shuffle_block_row_groups`` consecutive segments
(a bounded buffer, a few MB) with a permutation drawn from ``(seed, epoch, global worker, block)``.
Batches are cut greedily from the worker's row stream: a batch closes at ``batch_size`` rows or
when the next row would take it past ``max_tokens`` items. Only each worker's last batch can close
early, at the end of its rows (``drop_last`` drops it).

``batching="tokens"`` (``train/token_batching.py``)
    Batches are cut by a per-rank token budget (``max_tokens_per_rank``) and optionally an
    attention-cost budget (``max_attention_cost_per_rank``, sum of l^2), not by rows: every rank
    takes its part of the same length-bucketed global batch, split by Karmarkar-Karp so that the
    ranks' attention costs are close, and all ranks get exactly the same number of batches.
    ``batch_size`` and ``partition`` are not used; every rank reads every row group (its part of
    each global batch can come from any of them), windows of ``shuffle_block_row_groups`` row
    groups at a time, dealt to DataLoader workers round-robin.

Resume: ``state_dict(batches_consumed=k)`` records the epoch and k; a fresh dataset given that state
skips exactly those k batches and yields the rest of the epoch. The DataLoader hands out worker
batches round-robin (worker 0, 1, ..., skipping workers that have finished), so each worker's share
of k is derivable; the resumed DataLoader's workers take over the original workers' roles rotated
so that the remaining batches come in the original order. Do not use ``persistent_workers=True``:
workers would keep a stale copy of the epoch and resume state.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from train import token_batching
from train.batch import SequenceBatch, collate_rows

__all__ = ["load_manifest", "SequenceDataset", "SUPPORTED_SCHEMA_VERSIONS", "PARTITIONS"]

logger = logging.getLogger(__name__)

SUPPORTED_SCHEMA_VERSIONS = (1,)
PARTITIONS = ("rows", "row_groups", "strided")
BATCHINGS = ("rows", "tokens")
_PREPARE_HINT = "run `python -m data_pipeline prepare --config ...` first"

# Keys of state_dict() that describe how the epoch is cut into batches: resuming mid-epoch needs
# them unchanged, otherwise "k batches consumed" points at different rows.
_LAYOUT_KEYS = (
    "split",
    "num_rows",
    "batch_size",
    "max_tokens",
    "drop_last",
    "shuffle",
    "seed",
    "partition",
    "world_size",
    "num_workers",
    "shuffle_block_row_groups",
    "batching",
    "max_tokens_per_rank",
    "max_attention_cost_per_rank",
    "max_row_len",
)


def vocab_path(data_dir: str | os.PathLike, manifest: dict[str, Any], kind: str) -> Path:
    """The ``items`` or ``users`` vocabulary file that the manifest names (docs/data_format.md)."""
    default = {"items": "vocab/items.parquet", "users": "vocab/users.parquet"}
    return Path(data_dir) / manifest.get("vocab", default)[kind]


def raw_id_column(path: str | os.PathLike) -> pa.Array:
    """Dense id -> raw id as one Arrow string array (index 0, padding, is the empty string).

    Compact (offsets plus characters, about 12 bytes per id at 10^7 ids, no Python objects); map a
    batch of dense ids with ``column.take(ids)``.
    """
    t = pq.read_table(path, columns=["raw_id", "dense_id"])
    dense = t.column("dense_id").to_numpy()
    expected = np.arange(1, len(dense) + 1)
    raw = t.column("raw_id").cast(pa.string()).combine_chunks()
    if not np.array_equal(dense, expected):  # prepare writes them in dense id order; others may not
        order = np.argsort(dense)
        if not np.array_equal(dense[order], expected):
            raise ValueError(
                f"{path}: dense ids are not 1..{len(dense)}; prepare the data again ({_PREPARE_HINT})"
            )
        raw = raw.take(pa.array(order))
    return pa.concat_arrays([pa.array([""], pa.string()), raw])


def raw_ids_by_dense(path: str | os.PathLike) -> np.ndarray:
    """Dense id -> raw id (a Python string) from a vocabulary file; index 0 (padding) is the empty string."""
    return np.array(raw_id_column(path).to_pylist(), dtype=object)


def load_manifest(data_dir: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<data_dir>/manifest.json`` (written last by the prepare job)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise ValueError(f"data directory {data_dir} does not exist; {_PREPARE_HINT}")
    path = data_dir / "manifest.json"
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: {data_dir} is not a complete prepared data set "
            f"(the prepare job writes the manifest last); {_PREPARE_HINT}"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); {_PREPARE_HINT}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"{path} must hold a JSON object; {_PREPARE_HINT}")
    version = manifest.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise ValueError(
            f"{path}: schema_version {version!r} is not supported by this trainer "
            f"(supported: {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); re-run the prepare job "
            "with this version of the code"
        )
    if not isinstance(manifest.get("splits"), dict):
        raise ValueError(f"{path} has no 'splits' mapping; {_PREPARE_HINT}")
    return manifest


@dataclass(frozen=True)
class _Unit:
    """One row group of one file."""

    file_index: int
    row_group: int
    num_rows: int


# (unit index, first row, stop row) of a piece of a unit; a block is a list of segments.
_Segment = tuple[int, int, int]


def _batch_bounds(
    lengths: np.ndarray | None,
    num_rows: int,
    batch_size: int,
    max_tokens: int | None,
    final: bool,
    drop_last: bool,
) -> tuple[list[tuple[int, int]], int]:
    """Greedy batch cuts over a stream prefix of ``num_rows`` rows.

    Returns the closed batches as (start, stop) and the start of the unclosed remainder. A batch
    closes at ``batch_size`` rows or when the next row would exceed ``max_tokens``; with
    ``final=True`` the remainder becomes a last short batch unless ``drop_last``. The cuts do not
    depend on how the stream was chunked, which is what makes resuming exact.
    """
    bounds: list[tuple[int, int]] = []
    if max_tokens is None:
        num_full = num_rows // batch_size
        bounds = [(i * batch_size, (i + 1) * batch_size) for i in range(num_full)]
        start = num_full * batch_size
    else:
        assert lengths is not None and len(lengths) == num_rows
        cum = np.zeros(num_rows + 1, dtype=np.int64)
        np.cumsum(lengths, out=cum[1:])
        start = 0
        while start < num_rows:
            # Largest stop with sum(lengths[start:stop]) <= max_tokens (one search per batch, not per row).
            fit = int(np.searchsorted(cum, cum[start] + max_tokens, side="right")) - 1
            if fit == start:
                raise ValueError(
                    f"a row holds {int(lengths[start])} items, more than max_tokens={max_tokens}; "
                    "set max_tokens to at least max_seq_len + 1"
                )
            stop = min(start + batch_size, fit)
            if stop == num_rows and stop - start < batch_size:
                break  # may still grow with the next chunk
            bounds.append((start, stop))
            start = stop
    if final and start < num_rows and not drop_last:
        bounds.append((start, num_rows))
        start = num_rows
    return bounds, start


class SequenceDataset(IterableDataset):
    """Batches of one split of a prepared data directory for one rank (see the module docstring)."""

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str | list[str],
        batch_size: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        max_tokens: int | None = None,
        partition: str = "rows",
        shuffle_block_row_groups: int = 8,
        batching: str = "rows",
        max_tokens_per_rank: int | None = None,
        max_attention_cost_per_rank: int | None = None,
        max_row_len: int | None = None,
    ):
        """``num_workers`` must equal the DataLoader's (``dataset.loader()`` uses it); the partition
        of the data depends on it.

        ``batching="tokens"`` cuts batches by ``max_tokens_per_rank`` items and (optionally)
        ``max_attention_cost_per_rank`` (sum of squared row lengths) per rank; ``max_row_len``
        counts each row as at most that long (the trainer cuts rows to model.max_seq_len + 1).
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
        if partition == "strided" and max_tokens is not None:
            raise ValueError(
                "partition='strided' cuts batches by rows only; use max_tokens=None or partition='rows'"
            )
        if shuffle_block_row_groups < 1:
            raise ValueError(f"shuffle_block_row_groups must be >= 1, got {shuffle_block_row_groups}")
        if batching not in BATCHINGS:
            raise ValueError(f"batching must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        if batching == "tokens" and max_tokens_per_rank is None:
            raise ValueError(
                "batching='tokens' needs max_tokens_per_rank (data.max_tokens_per_rank): the items per rank "
                "and step; e.g. the rows-mode batch's items, batch_size / world_size * mean row length"
            )
        self.data_dir = Path(data_dir)
        self.manifest = load_manifest(self.data_dir)
        splits = self.manifest["splits"]
        names = [split] if isinstance(split, str) else list(split)
        for name in names:
            if name not in splits:
                raise ValueError(
                    f"split {name!r} is not in {self.data_dir / 'manifest.json'}; available: {', '.join(splits)}"
                )
        max_seq_len = self.manifest.get("max_seq_len")
        if max_tokens is not None:
            if max_tokens < 1:
                raise ValueError(f"max_tokens must be >= 1 or None, got {max_tokens}")
            if isinstance(max_seq_len, int) and max_tokens < max_seq_len + 1:
                raise ValueError(
                    f"max_tokens={max_tokens} is smaller than the longest possible row "
                    f"(max_seq_len + 1 = {max_seq_len + 1} in the manifest); raise max_tokens"
                )
        self.split = "+".join(names)  # several splits read as one stream, e.g. "train+older"
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.num_workers = num_workers
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.max_tokens = max_tokens
        self.partition = partition
        self.shuffle_block_row_groups = shuffle_block_row_groups
        self.batching = batching
        self.max_tokens_per_rank = max_tokens_per_rank
        self.max_attention_cost_per_rank = max_attention_cost_per_rank
        self.max_row_len = max_row_len
        self._token_plans: dict[int, tuple[list[list[int]], list[list[token_batching.GlobalBatch]]]] = {}
        self.epoch = 0
        self._resume_batches = 0  # batches of self.epoch to skip (from load_state_dict)
        self._batches_yielded = 0  # in-process iteration only (num_workers=0)

        self.files: list[Path] = []
        self.units: list[_Unit] = []
        column_sets = []
        for name in names:
            files, units, columns = self._list_units(name, splits[name], len(self.files))
            self.files += files
            self.units += units
            column_sets.append(columns)
        self.columns = min(column_sets, key=len)  # timestamps only when every split has them
        self.num_rows = sum(u.num_rows for u in self.units)
        if batching == "tokens":
            longest = max_seq_len + 1 if isinstance(max_seq_len, int) else None
            if max_row_len is not None:
                longest = max_row_len if longest is None else min(longest, max_row_len)
            if longest is not None:
                token_batching.check_budgets(longest, max_tokens_per_rank, max_attention_cost_per_rank)
            if self.num_rows < world_size:
                raise ValueError(f"{self.split} has {self.num_rows} rows, fewer than the {world_size} ranks")
        self._open_files: dict[int, pq.ParquetFile] = {}
        self._unit_lengths: dict[int, np.ndarray] = {}
        self._count_cache: dict[tuple[int, int], int] = {}
        logger.info(
            "%s split: %d rows in %d files / %d row groups; rank %d/%d, %d worker(s), partition=%s",
            self.split,
            self.num_rows,
            len(self.files),
            len(self.units),
            rank,
            world_size,
            max(1, num_workers),
            partition,
        )

    # ----------------------------------------------------------------------------------- listing

    def _list_units(
        self, split: str, split_info: dict[str, Any], first_file: int
    ) -> tuple[list[Path], list[_Unit], list[str]]:
        """Files of a split from the manifest, row groups from their footers (numbered from file
        ``first_file``), columns to read."""
        entries = split_info.get("files")
        if not isinstance(entries, list):
            raise ValueError(f"{self.data_dir / 'manifest.json'}: splits.{split}.files must be a list")
        files: list[Path] = []
        units: list[_Unit] = []
        has_timestamps = True
        for i, entry in enumerate(entries):
            rel = entry["path"] if isinstance(entry, dict) else str(entry)
            path = self.data_dir / rel
            if not path.is_file() and (self.data_dir / split / rel).is_file():
                path = self.data_dir / split / rel
            if not path.is_file():
                raise ValueError(
                    f"{self.data_dir / 'manifest.json'} lists {rel} for split {split!r} but the file is "
                    f"missing; the data directory is damaged: {_PREPARE_HINT} again"
                )
            meta = pq.ParquetFile(path).metadata
            names = set(meta.schema.to_arrow_schema().names)
            missing = {"user_id", "item_ids"} - names
            if missing:
                raise ValueError(
                    f"{path} lacks column(s) {sorted(missing)}; expected the docs/data_format.md schema"
                )
            has_timestamps = has_timestamps and "timestamps" in names
            expected = entry.get("num_rows") if isinstance(entry, dict) else None
            if expected is not None and expected != meta.num_rows:
                raise ValueError(
                    f"{path} holds {meta.num_rows} rows but the manifest says {expected}; the data directory "
                    f"is damaged or was modified: {_PREPARE_HINT} again"
                )
            files.append(path)
            for rg in range(meta.num_row_groups):
                units.append(_Unit(first_file + i, rg, meta.row_group(rg).num_rows))
        if self.manifest.get("has_timestamps") is False:
            has_timestamps = False
        columns = ["user_id", "item_ids"] + (["timestamps"] if has_timestamps else [])
        return files, units, columns

    def __getstate__(self) -> dict[str, Any]:
        # Open Parquet handles are per process; DataLoader workers reopen them.
        state = self.__dict__.copy()
        state["_open_files"] = {}
        return state

    # ------------------------------------------------------------------------ token batching

    def _unit_row_lengths(self, unit_index: int) -> np.ndarray:
        """Lengths of a unit's rows (cached; reads the item_ids column only), capped at max_row_len."""
        lengths = self._unit_lengths.get(unit_index)
        if lengths is None:
            table = self._read_segment((unit_index, 0, self.units[unit_index].num_rows), ["item_ids"])
            lengths = self._unit_lengths[unit_index] = _row_lengths(table)
        return lengths if self.max_row_len is None else np.minimum(lengths, self.max_row_len)

    def _token_plan(self, epoch: int) -> tuple[list[list[int]], list[list[token_batching.GlobalBatch]]]:
        """(unit indices of each window, each window's global batches) for ``epoch``; cached."""
        if epoch not in self._token_plans:
            order = [int(u) for u in self._unit_order(epoch)]
            positions = token_batching.group_units(
                [self.units[u].num_rows for u in order], self.shuffle_block_row_groups, self.world_size
            )
            windows = [[order[p] for p in window] for window in positions]
            lengths = [np.concatenate([self._unit_row_lengths(u) for u in window]) for window in windows]
            plan = token_batching.plan_epoch(
                lengths, self.world_size, self.max_tokens_per_rank, self.max_attention_cost_per_rank,
                self.seed, epoch, self.shuffle,
            )  # fmt: skip
            self._token_plans = {epoch: (windows, plan)}  # one epoch at a time
        return self._token_plans[epoch]

    def _token_worker_counts(self, epoch: int) -> list[int]:
        """Batches of each local worker (window i goes to worker i % num_workers)."""
        num_local = max(1, self.num_workers)
        _, plan = self._token_plan(epoch)
        counts = [0] * num_local
        for i, batches in enumerate(plan):
            counts[i % num_local] += len(batches)
        return counts

    def _iter_tokens(self, epoch: int, worker: int, num_local: int) -> Iterator[SequenceBatch]:
        windows, plan = self._token_plan(epoch)
        rotation, skips = token_batching.round_robin_position(
            self._token_worker_counts(epoch), self._resume_batches
        )
        role = (worker + rotation) % num_local
        skip = skips[role]
        self._batches_yielded = self._resume_batches
        for i in range(role, len(plan), num_local):
            if skip >= len(plan[i]):
                skip -= len(plan[i])
                continue
            table = pa.concat_tables(
                [self._read_segment((u, 0, self.units[u].num_rows), self.columns) for u in windows[i]]
            )
            for batch in plan[i][skip:]:
                self._batches_yielded += 1
                yield collate_rows(table.take(pa.array(batch.parts[self.rank], type=pa.int64())))
            skip = 0

    # ---------------------------------------------------------------------------------- planning

    def _unit_order(self, epoch: int) -> np.ndarray:
        """The epoch's unit permutation, the same on every rank and worker."""
        if not self.shuffle:
            return np.arange(len(self.units))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.units))

    def _worker_blocks(self, epoch: int, g: int, num_global: int) -> list[list[_Segment]]:
        """Segments global worker ``g`` reads this epoch, grouped into shuffle blocks."""
        order = self._unit_order(epoch)
        segments: list[_Segment] = []
        if self.partition == "row_groups":
            segments = [(int(u), 0, self.units[u].num_rows) for u in order[g::num_global]]
        elif self.partition == "strided":  # everyone reads everything; _iter_strided keeps its rows
            segments = [(int(u), 0, self.units[u].num_rows) for u in order]
        else:
            sizes = np.array([self.units[u].num_rows for u in order], dtype=np.int64)
            ends = np.cumsum(sizes)
            lo, hi = g * self.num_rows // num_global, (g + 1) * self.num_rows // num_global
            first = int(np.searchsorted(ends, lo, side="right"))
            for pos in range(first, len(order)):
                unit_start = int(ends[pos] - sizes[pos])
                if unit_start >= hi:
                    break
                start, stop = max(lo, unit_start) - unit_start, min(hi, int(ends[pos])) - unit_start
                if stop > start:
                    segments.append((int(order[pos]), start, stop))
        k = self.shuffle_block_row_groups
        return [segments[i : i + k] for i in range(0, len(segments), k)]

    def _block_permutation(
        self, epoch: int, g: int, num_global: int, block: int, n: int
    ) -> np.ndarray | None:
        if not self.shuffle:
            return None
        if self.partition == "strided":  # one stream for all workers
            return np.random.default_rng([self.seed, epoch, block]).permutation(n)
        return np.random.default_rng([self.seed, epoch, num_global, g, block]).permutation(n)

    # ----------------------------------------------------------------------------------- reading

    def _file(self, index: int) -> pq.ParquetFile:
        handle = self._open_files.get(index)
        if handle is None:
            handle = self._open_files[index] = pq.ParquetFile(self.files[index])
        return handle

    def _read_segment(self, seg: _Segment, columns: list[str]) -> pa.Table:
        unit = self.units[seg[0]]
        table = self._file(unit.file_index).read_row_group(unit.row_group, columns=columns)
        return table.slice(seg[1], seg[2] - seg[1])

    def _read_block(self, block: list[_Segment], perm: np.ndarray | None) -> pa.Table:
        table = pa.concat_tables([self._read_segment(seg, self.columns) for seg in block])
        return table if perm is None else table.take(pa.array(perm))

    def _block_lengths(self, block: list[_Segment], perm: np.ndarray | None) -> np.ndarray:
        """Row lengths of a block in stream order, from a per-unit cache (reads item_ids only)."""
        parts = []
        for unit_index, start, stop in block:
            lengths = self._unit_lengths.get(unit_index)
            if lengths is None:
                table = self._read_segment((unit_index, 0, self.units[unit_index].num_rows), ["item_ids"])
                lengths = _row_lengths(table)
                self._unit_lengths[unit_index] = lengths
            parts.append(lengths[start:stop])
        lengths = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        return lengths if perm is None else lengths[perm]

    # ------------------------------------------------------------------------- counting / resume

    def _worker_num_rows(self, epoch: int, g: int, num_global: int) -> int:
        if self.partition == "strided":
            return len(range(g, self.num_rows, num_global))
        return sum(
            stop - start for block in self._worker_blocks(epoch, g, num_global) for _, start, stop in block
        )

    def _worker_num_batches(self, epoch: int, g: int, num_global: int) -> int:
        """Exact number of batches global worker ``g`` yields in ``epoch``."""
        key = (epoch, g)
        if key in self._count_cache:
            return self._count_cache[key]
        if self.max_tokens is None:
            rows = self._worker_num_rows(epoch, g, num_global)
            count = rows // self.batch_size + int(rows % self.batch_size > 0 and not self.drop_last)
        else:
            count = 0
            pending = np.zeros(0, np.int32)
            blocks = self._worker_blocks(epoch, g, num_global)
            for bi, block in enumerate(blocks):
                n = sum(stop - start for _, start, stop in block)
                perm = self._block_permutation(epoch, g, num_global, bi, n)
                pending = np.concatenate([pending, self._block_lengths(block, perm)])
                bounds, rest = _batch_bounds(
                    pending, len(pending), self.batch_size, self.max_tokens, False, False
                )
                count += len(bounds)
                pending = pending[rest:]
            bounds, _ = _batch_bounds(
                pending, len(pending), self.batch_size, self.max_tokens, True, self.drop_last
            )
            count += len(bounds)
        self._count_cache[key] = count
        return count

    def _worker_lower_bound(self, epoch: int, g: int, num_global: int) -> int:
        """A cheap lower bound on the batch count (exact without max_tokens); needs no reading."""
        rows = self._worker_num_rows(epoch, g, num_global)
        if self.max_tokens is None:
            return self._worker_num_batches(epoch, g, num_global)
        # Every closed batch holds <= batch_size rows, and an unclosed remainder < batch_size.
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _resume_plan(self, epoch: int, consumed: int) -> tuple[int, list[int]]:
        """Where ``consumed`` rank batches leave each local worker: (rotation, batches consumed per worker).

        The DataLoader emits worker batches in the order (round j, worker w), i.e. by j * W + w,
        skipping pairs past a worker's last batch. If the next batch due is (j*, s), worker w has
        consumed min(n_w, j* + [w < s]) batches. A new DataLoader starts its round-robin at worker 0,
        so worker i of the resumed run plays original worker (i + s) % W: its order is then the
        original order minus the first ``consumed`` batches, exactly.
        """
        num_local = max(1, self.num_workers)
        if consumed == 0:
            return 0, [0] * num_local
        num_global = self.world_size * num_local
        gs = [self.rank * num_local + w for w in range(num_local)]
        lower = [self._worker_lower_bound(epoch, g, num_global) for g in gs]
        if consumed < num_local * min(lower):
            # No worker runs out within the first `consumed` batches: plain round-robin.
            rnd, s = divmod(consumed, num_local)
            return s, [rnd + int(w < s) for w in range(num_local)]
        counts = [self._worker_num_batches(epoch, g, num_global) for g in gs]
        if consumed > sum(counts):
            raise ValueError(
                f"state says {consumed} batches of epoch {epoch} were consumed, but rank {self.rank} "
                f"only has {sum(counts)}; the state does not belong to this data or layout"
            )
        if consumed == sum(counts):
            return 0, counts
        remaining, rnd = consumed, 0
        while True:  # one iteration per round, not per batch row
            active = [w for w in range(num_local) if counts[w] > rnd]
            if remaining < len(active):
                s = active[remaining]
                return s, [min(counts[w], rnd + int(w < s)) for w in range(num_local)]
            remaining -= len(active)
            rnd += 1

    def _rows_to_skip(self, epoch: int, g: int, num_global: int, skip_batches: int) -> int:
        """Rows of worker g's stream covered by its first ``skip_batches`` batches."""
        if skip_batches == 0:
            return 0
        if self.max_tokens is None:
            return skip_batches * self.batch_size
        done, offset = 0, 0  # batches seen, stream row of pending[0]
        pending = np.zeros(0, np.int32)
        for bi, block in enumerate(self._worker_blocks(epoch, g, num_global)):
            n = sum(stop - start for _, start, stop in block)
            pending = np.concatenate(
                [pending, self._block_lengths(block, self._block_permutation(epoch, g, num_global, bi, n))]
            )
            bounds, rest = _batch_bounds(
                pending, len(pending), self.batch_size, self.max_tokens, False, False
            )
            if done + len(bounds) >= skip_batches:
                return offset + bounds[skip_batches - done - 1][1]
            done += len(bounds)
            offset += rest
            pending = pending[rest:]
        bounds, _ = _batch_bounds(
            pending, len(pending), self.batch_size, self.max_tokens, True, self.drop_last
        )
        assert done + len(bounds) >= skip_batches, "skip beyond the worker's batches"
        return offset + bounds[skip_batches - done - 1][1]

    # --------------------------------------------------------------------------------- iteration

    def _strided_tables(self, epoch: int, g: int, num_global: int, skip_batches: int) -> Iterator[pa.Table]:
        """``partition='strided'``: rows g, g+G, ... of the shared stream, after the skipped rows."""
        skip_rows = skip_batches * self.batch_size  # rows of this worker's own stream
        stream_pos, own_pos = 0, 0  # first row of the current block in the shared / own stream
        for bi, block in enumerate(self._worker_blocks(epoch, g, num_global)):
            n = sum(stop - start for _, start, stop in block)
            mine = np.arange((g - stream_pos) % num_global, n, num_global)
            stream_pos += n
            if own_pos + len(mine) <= skip_rows:
                own_pos += len(mine)
                continue
            perm = self._block_permutation(epoch, g, num_global, bi, n)
            table = self._read_block(block, perm).take(pa.array(mine))
            if skip_rows > own_pos:
                table = table.slice(skip_rows - own_pos)
            own_pos += len(mine)
            yield table

    def _range_tables(self, epoch: int, g: int, num_global: int, skip_batches: int) -> Iterator[pa.Table]:
        """``partition='rows'``/``'row_groups'``: the worker's own blocks, after the skipped rows."""
        skip_rows = self._rows_to_skip(epoch, g, num_global, skip_batches)
        stream_pos = 0  # stream row index of the current block's first row
        for bi, block in enumerate(self._worker_blocks(epoch, g, num_global)):
            n = sum(stop - start for _, start, stop in block)
            if stream_pos + n <= skip_rows:
                stream_pos += n
                continue
            table = self._read_block(block, self._block_permutation(epoch, g, num_global, bi, n))
            if skip_rows > stream_pos:
                table = table.slice(skip_rows - stream_pos)
            stream_pos += n
            yield table

    def _iter_worker(self, epoch: int, g: int, num_global: int, skip_batches: int) -> Iterator[SequenceBatch]:
        """Cut the worker's stream of row blocks into batches."""
        tables = self._strided_tables if self.partition == "strided" else self._range_tables
        pending: pa.Table | None = None
        for table in tables(epoch, g, num_global, skip_batches):
            pending = table if pending is None else pa.concat_tables([pending, table])
            bounds, rest = self._cut(pending, final=False)
            for start, stop in bounds:
                yield collate_rows(pending.slice(start, stop - start))
            pending = pending.slice(rest)
        if pending is not None and len(pending):
            bounds, _ = self._cut(pending, final=True)
            for start, stop in bounds:
                yield collate_rows(pending.slice(start, stop - start))

    def _cut(self, table: pa.Table, final: bool) -> tuple[list[tuple[int, int]], int]:
        """Batch cuts of ``table`` (a prefix of the worker's stream) and the start of its remainder."""
        lengths = _row_lengths(table) if self.max_tokens is not None else None
        return _batch_bounds(lengths, len(table), self.batch_size, self.max_tokens, final, self.drop_last)

    def __iter__(self) -> Iterator[SequenceBatch]:
        info = get_worker_info()
        num_local = info.num_workers if info is not None else 1
        worker = info.id if info is not None else 0
        if num_local != max(1, self.num_workers):
            raise ValueError(
                f"SequenceDataset was built with num_workers={self.num_workers} but is read by "
                f"{num_local if info is not None else 'no'} DataLoader worker(s); pass the same num_workers "
                "to both (dataset.loader() does)"
            )
        epoch = self.epoch
        if self.batching == "tokens":
            yield from self._iter_tokens(epoch, worker, num_local)
            return
        num_global = self.world_size * num_local
        rotation, skips = self._resume_plan(epoch, self._resume_batches)
        role = (worker + rotation) % num_local  # which worker of the uninterrupted run this one continues
        g = self.rank * num_local + role
        skip = skips[role]
        self._batches_yielded = self._resume_batches
        for batch in self._iter_worker(epoch, g, num_global, skip):
            self._batches_yielded += 1
            yield batch

    # ------------------------------------------------------------------------------- public API

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shuffles derive from ``(seed, epoch)``); call it before every epoch.

        A resume point loaded with ``load_state_dict`` applies to its own epoch only.
        """
        if epoch != self.epoch:
            self._resume_batches = 0
        self.epoch = epoch

    def num_batches_for_rank(self) -> int:
        """Batches this rank yields in the current epoch (all of them, including any skipped on resume).

        With ``max_tokens`` this reads the ``item_ids`` column once to learn the row lengths.
        """
        if self.batching == "tokens":
            return sum(self._token_worker_counts(self.epoch))
        num_local = max(1, self.num_workers)
        num_global = self.world_size * num_local
        return sum(
            self._worker_num_batches(self.epoch, self.rank * num_local + w, num_global)
            for w in range(num_local)
        )

    def state_dict(self, batches_consumed: int | None = None) -> dict[str, Any]:
        """Resume point: ``epoch`` and ``batches_consumed`` (this rank's batches of that epoch so far).

        With ``num_workers=0`` the dataset counts the batches it yielded itself; with DataLoader
        workers it cannot see them, so pass ``batches_consumed`` (counting from the start of the
        epoch, including batches skipped on a resume).
        """
        consumed = self._batches_yielded if batches_consumed is None else int(batches_consumed)
        state: dict[str, Any] = {"epoch": self.epoch, "batches_consumed": consumed}
        state.update({key: getattr(self, key) for key in _LAYOUT_KEYS})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration yields the rest of ``state['epoch']``."""
        consumed = int(state["batches_consumed"])
        if consumed < 0:
            raise ValueError(f"batches_consumed must be >= 0, got {consumed}")
        if consumed > 0:
            for key in _LAYOUT_KEYS:
                if key in state and state[key] != getattr(self, key):
                    raise ValueError(
                        f"cannot resume mid-epoch: the saved reader state has {key}={state[key]!r} but this "
                        f"dataset has {key}={getattr(self, key)!r}; use the same settings, or resume at the "
                        "next epoch boundary (batches_consumed=0)"
                    )
        self.epoch = int(state["epoch"])
        self._resume_batches = consumed
        self._batches_yielded = consumed
        self._count_cache.clear()

    def loader(self, pin_memory: bool = False, prefetch_factor: int | None = None) -> DataLoader:
        """The matching ``DataLoader``: whole batches (``batch_size=None``), ``self.num_workers`` workers."""
        kwargs: dict[str, Any] = {}
        if self.num_workers > 0 and prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        return DataLoader(
            self,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            **kwargs,
        )


def _row_lengths(table: pa.Table) -> np.ndarray:
    """Per-row ``item_ids`` lengths (int32: rows hold at most max_seq_len + 1 items; the cache stays small)."""
    if not len(table):
        return np.zeros(0, np.int32)
    return pc.list_value_length(table.column("item_ids")).to_numpy().astype(np.int32, copy=False)
