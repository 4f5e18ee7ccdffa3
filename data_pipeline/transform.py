"""Vectorized transforms of the ``prepare`` job (Arrow + NumPy, no per-row Python).

Stages, in order:

* ``validate_records``: raw fields -> typed interactions (user/item strings, int64 unix-second
  timestamps, float32 ratings, event strings) plus rejected rows with a reason.
* ``record_filters``: ``filters.min_rating`` and ``filters.events``.
* ``bucket_of``: a stable 64-bit hash of the user id picks the user's bucket, so one bucket holds
  whole users and can be processed by one task.
* ``sort_interactions`` / ``dedup`` / ``core_filter``: within a bucket, per-user chronological order
  (timestamp, then file, then row), duplicate removal and one round of the k-core / min_seq_len
  fixed point.
* ``build_split_rows``: dense ids -> one row per user and split (docs/data_format.md).

An interaction table has the columns ``user`` (string), ``item`` (string), ``timestamp`` (int64,
null without timestamps), optional ``rating`` (float32) and ``event`` (string), ``src`` (int32, file
index) and ``pos`` (int64, position in that file).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from data_pipeline.config import FiltersConfig, SplitConfig
from data_pipeline.readers import RawRecords

REJECT_REASONS = (
    "",  # code 0: accepted
    "missing_user",
    "missing_item",
    "missing_timestamp",
    "bad_timestamp",
    "missing_rating",
    "nan_rating",
    "bad_rating",
    "missing_event",
)
_CODE = {reason: code for code, reason in enumerate(REJECT_REASONS)}

SPLITS = ("train", "valid", "test")
# Optional split (split.older_windows): the history that max_seq_len cut from the train rows.
OLDER_SPLIT = "older"

_INT_RE = r"^[+-]?[0-9]{1,18}$"
_DECIMAL_RE = r"^[+-]?([0-9]{1,18}\.[0-9]*|\.[0-9]+)$"
_NUMBER_RE = r"^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?$"


def interaction_schema(has_rating: bool, has_event: bool) -> pa.Schema:
    """Schema of the validated interaction tables passed between stages."""
    fields = [("user", pa.string()), ("item", pa.string()), ("timestamp", pa.int64())]
    if has_rating:
        fields.append(("rating", pa.float32()))
    if has_event:
        fields.append(("event", pa.string()))
    fields += [("src", pa.int32()), ("pos", pa.int64())]
    return pa.schema(fields)


# ---------------------------------------------------------------------------------------------------
# Validation


def _as_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _is_empty_or_null(values: pa.Array) -> np.ndarray:
    empty = pc.equal(pc.utf8_length(values), 0)
    return np.asarray(pc.fill_null(pc.or_kleene(pc.is_null(values), empty), True))


def _to_text(values: pa.Array) -> pa.Array:
    """Ids are strings: integers print without a decimal point, text is trimmed."""
    values = _as_array(values)
    if pa.types.is_null(values.type):
        return pa.nulls(len(values), pa.string())
    if pa.types.is_large_string(values.type) or pa.types.is_binary(values.type):
        values = values.cast(pa.string())
    if not pa.types.is_string(values.type):
        if pa.types.is_floating(values.type):
            integral = pc.fill_null(pc.equal(pc.floor(values), values), False)
            as_int = pc.if_else(integral, values, pa.scalar(None, values.type)).cast(pa.int64(), safe=False)
            values = pc.if_else(integral, as_int.cast(pa.string()), values.cast(pa.string()))
        else:
            values = values.cast(pa.string())
    return pc.utf8_trim_whitespace(values)


def _parse_timestamps(values: pa.Array, fmt: str) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """-> (int64 unix seconds with nulls, missing mask, unparseable mask)."""
    values = _as_array(values)
    n = len(values)
    t = values.type
    if pa.types.is_null(t):
        return pa.nulls(n, pa.int64()), np.ones(n, bool), np.zeros(n, bool)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        seconds = values.cast(pa.timestamp("s"), safe=False).cast(pa.int64())
        missing = np.asarray(pc.is_null(values))
        return seconds, missing, np.zeros(n, bool)
    if pa.types.is_integer(t) or pa.types.is_floating(t):
        missing = np.asarray(pc.is_null(values))
        if pa.types.is_floating(t):
            finite = np.asarray(pc.fill_null(pc.is_finite(values), False))
            bad = ~missing & ~finite
            clean = pc.if_else(pa.array(finite), values, pa.scalar(None, t))
            values = pc.floor(clean).cast(pa.int64(), safe=False)
        else:
            bad = np.zeros(n, bool)
            values = values.cast(pa.int64())
        if fmt == "unix_ms":
            values = _floor_div(values, 1000)
        return values, missing, bad
    text = _to_text(values)
    missing = _is_empty_or_null(text)
    if fmt in ("unix", "unix_ms") and not missing.any():
        try:  # fast path: every value is an integer
            seconds = text.cast(pa.int64())
            return (_floor_div(seconds, 1000) if fmt == "unix_ms" else seconds), missing, np.zeros(n, bool)
        except pa.ArrowInvalid:
            pass
    if fmt in ("unix", "unix_ms"):
        is_int = pc.fill_null(pc.match_substring_regex(text, _INT_RE), False)
        is_dec = pc.fill_null(pc.match_substring_regex(text, _DECIMAL_RE), False)
        text = pc.replace_substring_regex(text, pattern=r"^\+", replacement="")  # Arrow's cast rejects "+5"
        ints = pc.if_else(is_int, text, pa.scalar(None, pa.string())).cast(pa.int64())
        decs = pc.floor(pc.if_else(is_dec, text, pa.scalar(None, pa.string())).cast(pa.float64()))
        seconds = pc.coalesce(ints, decs.cast(pa.int64(), safe=False))
        if fmt == "unix_ms":
            seconds = _floor_div(seconds, 1000)
    else:
        parsed = pc.strptime(text, format=fmt, unit="s", error_is_null=True)
        seconds = parsed.cast(pa.int64())
    bad = ~missing & np.asarray(pc.is_null(seconds))
    return seconds, missing, bad


def _floor_div(values: pa.Array, divisor: int) -> pa.Array:
    mask = np.asarray(pc.is_null(values))
    filled = np.asarray(pc.fill_null(values, 0), dtype=np.int64) // divisor
    return pa.array(filled, pa.int64(), mask=mask)


def _parse_ratings(values: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray, np.ndarray]:
    """-> (float32 ratings, missing mask, NaN mask, unparseable mask)."""
    values = _as_array(values)
    n = len(values)
    if pa.types.is_null(values.type):
        return pa.nulls(n, pa.float32()), np.ones(n, bool), np.zeros(n, bool), np.zeros(n, bool)
    if (
        pa.types.is_integer(values.type)
        or pa.types.is_floating(values.type)
        or pa.types.is_decimal(values.type)
    ):
        numbers = values.cast(pa.float64())
        missing = np.asarray(pc.is_null(numbers))
        nan = np.asarray(pc.fill_null(pc.is_nan(numbers), False))
        bad = ~missing & ~nan & ~np.asarray(pc.fill_null(pc.is_finite(numbers), True))
        return numbers.cast(pa.float32()), missing, nan, bad
    text = _to_text(values)
    missing = _is_empty_or_null(text)
    if not missing.any():
        try:  # fast path: every value parses as a number ("nan" and "inf" included, checked below)
            numbers = text.cast(pa.float64())
            nan = np.asarray(pc.is_nan(numbers))
            bad = ~nan & ~np.asarray(pc.is_finite(numbers))
            return numbers.cast(pa.float32()), missing, nan, bad
        except pa.ArrowInvalid:
            pass
    ok = pc.fill_null(pc.match_substring_regex(text, _NUMBER_RE), False)
    numbers = pc.if_else(ok, text, pa.scalar(None, pa.string())).cast(pa.float64())
    nan = np.asarray(pc.fill_null(pc.is_in(pc.utf8_lower(text), pa.array(["nan", "+nan", "-nan"])), False))
    finite = np.asarray(pc.fill_null(pc.is_finite(numbers), False))
    bad = ~missing & ~nan & ~finite
    return numbers.cast(pa.float32()), missing, nan, bad


def _render_raw(fields: dict[str, pa.Array], rows: np.ndarray) -> list[str]:
    """Raw text of rejected Parquet rows (few by construction): the mapped fields as JSON."""
    taken = {name: _as_array(values).take(pa.array(rows)).to_pylist() for name, values in fields.items()}
    return [json.dumps({name: taken[name][i] for name in taken}, default=str) for i in range(len(rows))]


@dataclass
class Validated:
    """Typed interactions of one piece and its rejected records."""

    table: pa.Table
    reject_line: np.ndarray
    reject_reason: list[str]
    reject_raw: list[str]


def validate_records(
    records: RawRecords, src_index: int, timestamp_format: str, has_rating: bool, has_event: bool
) -> Validated:
    """Type and check every record; the first failing check names the reject reason."""
    n = len(records.pos)
    fields = records.fields
    code = np.zeros(n, dtype=np.int8)

    def flag(reason: str, mask: np.ndarray) -> None:
        code[(code == 0) & mask] = _CODE[reason]

    users = _to_text(fields["user"])
    items = _to_text(fields["item"])
    flag("missing_user", _is_empty_or_null(users))
    flag("missing_item", _is_empty_or_null(items))
    if "timestamp" in fields:
        timestamps, ts_missing, ts_bad = _parse_timestamps(fields["timestamp"], timestamp_format)
        flag("missing_timestamp", ts_missing)
        flag("bad_timestamp", ts_bad)
    else:
        timestamps = pa.nulls(n, pa.int64())
    columns = {"user": users, "item": items, "timestamp": timestamps}
    if has_rating:
        ratings, r_missing, r_nan, r_bad = _parse_ratings(fields["rating"])
        flag("missing_rating", r_missing)
        flag("nan_rating", r_nan)
        flag("bad_rating", r_bad)
        columns["rating"] = ratings
    if has_event:
        events = _to_text(fields["event"])
        flag("missing_event", _is_empty_or_null(events))
        columns["event"] = events
    columns["src"] = pa.array(np.full(n, src_index, dtype=np.int32))
    columns["pos"] = pa.array(records.pos, pa.int64())
    table = pa.table(columns, schema=interaction_schema(has_rating, has_event))
    rejected = np.flatnonzero(code)
    if len(rejected) == 0:
        return Validated(table, np.zeros(0, np.int64), [], [])
    if records.raw is None:
        raw = _render_raw(fields, rejected)
    else:
        raw_rows = rejected if records.raw_index is None else records.raw_index[rejected]
        raw = [line.rstrip("\r\n") for line in records.raw.take(pa.array(raw_rows)).to_pylist()]
    return Validated(
        table=table.filter(pa.array(code == 0)),
        reject_line=records.line[rejected],
        reject_reason=[REJECT_REASONS[c] for c in code[rejected]],
        reject_raw=raw,
    )


def record_filters(table: pa.Table, filters: FiltersConfig) -> tuple[pa.Table, dict[str, int]]:
    """Apply the per-interaction filters; returns the kept rows and how many each filter removed."""
    removed = {"min_rating": 0, "events": 0}
    if filters.min_rating is not None and "rating" in table.column_names:
        keep = pc.greater_equal(table["rating"], pa.scalar(filters.min_rating, pa.float32()))
        before = table.num_rows
        table = table.filter(keep)
        removed["min_rating"] = before - table.num_rows
    if filters.events is not None and "event" in table.column_names:
        keep = pc.is_in(table["event"], value_set=pa.array(filters.events, pa.string()))
        before = table.num_rows
        table = table.filter(keep)
        removed["events"] = before - table.num_rows
    return table, removed


# ---------------------------------------------------------------------------------------------------
# Bucketing

_HASH_BASE = np.uint64(0x100000001B3)


# Strings hashed per step of stable_hash: its temporaries take ~40 bytes per input byte, so a
# vocabulary of 10^7 ids is hashed in slices rather than at once.
_HASH_STEP = 1 << 18


def stable_hash(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each string that is the same in every process and on every machine
    (Python's ``hash`` is salted per process). Polynomial over the UTF-8 bytes + splitmix64 mixing."""
    arr = _as_array(values)
    if len(arr) <= _HASH_STEP:
        return _stable_hash(arr)
    return np.concatenate([_stable_hash(arr.slice(i, _HASH_STEP)) for i in range(0, len(arr), _HASH_STEP)])


def _stable_hash(values: pa.Array) -> np.ndarray:
    arr = values.cast(pa.large_string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data_buffer = arr.buffers()[2]
    data = np.frombuffer(data_buffer, dtype=np.uint8) if data_buffer is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    first = offsets[0] if n else 0
    h = np.zeros(n, dtype=np.uint64)
    total = int(offsets[-1] - first) if n else 0
    if total:
        chunk = data[first : first + total].astype(np.uint64) + np.uint64(1)
        rel = offsets[:-1] - first
        pos_in_string = np.arange(total, dtype=np.int64) - np.repeat(rel, lengths)
        powers = np.cumprod(np.full(int(lengths.max()), _HASH_BASE, dtype=np.uint64))
        with np.errstate(over="ignore"):
            contrib = chunk * powers[pos_in_string]
            nonempty = lengths > 0
            h[nonempty] = np.add.reduceat(contrib, rel[nonempty])
    with np.errstate(over="ignore"):
        h ^= lengths.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        h ^= h >> np.uint64(30)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(27)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(31)
    return h


def bucket_of(users: pa.Array | pa.ChunkedArray, num_buckets: int) -> np.ndarray:
    """The bucket (0..num_buckets-1) of each user id. Hashes each distinct id once: a user's
    interactions usually repeat its id many times."""
    encoded = pc.dictionary_encode(_as_array(users))
    buckets = (stable_hash(encoded.dictionary) % np.uint64(num_buckets)).astype(np.int64)
    return buckets[np.asarray(encoded.indices)]


# ---------------------------------------------------------------------------------------------------
# Vocabulary lookup


@dataclass
class HashedVocab:
    """A vocabulary as two NumPy arrays: the 64-bit ``stable_hash`` of each raw id, sorted, and the
    dense id of each. A task finds the dense ids of its ids by binary search, so its memory is that
    of its own ids, not a hash table of the whole vocabulary (10^7 ids -> 160 MB, shared read-only
    through Ray's object store)."""

    sorted_hashes: np.ndarray  # uint64, ascending, no duplicates
    dense_ids: np.ndarray  # int64, dense id of sorted_hashes[i]


def hashed_vocab(raw_ids: pa.Array | pa.ChunkedArray) -> HashedVocab | None:
    """The ``HashedVocab`` of raw ids whose dense ids are 1..n in order; None when two ids share a
    64-bit hash (about n^2 / 2^65: ~3e-6 for 10^7 ids), then the caller looks ids up by value."""
    hashes = stable_hash(raw_ids)
    order = np.argsort(hashes, kind="stable")
    sorted_hashes = hashes[order]
    if len(sorted_hashes) > 1 and not np.all(sorted_hashes[1:] != sorted_hashes[:-1]):
        return None
    return HashedVocab(sorted_hashes, order.astype(np.int64) + 1)


def dense_ids_of(values: pa.Array | pa.ChunkedArray, vocab: HashedVocab | pa.Array) -> np.ndarray:
    """Dense id (int64) of each value; every value must be in the vocabulary. ``vocab`` is a
    ``HashedVocab``, or the raw ids in dense-id order (the fallback of ``hashed_vocab``)."""
    if not isinstance(vocab, HashedVocab):
        dense = np.asarray(pc.index_in(values, value_set=vocab).fill_null(-1), dtype=np.int64) + 1
        assert (dense > 0).all(), "every kept id is in the vocabulary"
        return dense
    # Each distinct value is hashed and searched once; an id usually repeats within a bucket.
    encoded = pc.dictionary_encode(_as_array(values))
    hashes = stable_hash(encoded.dictionary)
    pos = np.searchsorted(vocab.sorted_hashes, hashes)
    # The vocabulary holds every value and no two of its hashes are equal, so an equal hash is the
    # value itself.
    pos = np.minimum(pos, len(vocab.sorted_hashes) - 1)
    assert len(hashes) == 0 or (vocab.sorted_hashes[pos] == hashes).all(), (
        "every kept id is in the vocabulary"
    )
    return vocab.dense_ids[pos][np.asarray(encoded.indices)]


# ---------------------------------------------------------------------------------------------------
# Per-bucket work


def sort_interactions(table: pa.Table, has_timestamps: bool) -> pa.Table:
    """Group by user, chronological within a user; ties by file order, then row order.

    Users are grouped by their dictionary code (order of first appearance), not sorted as strings:
    only grouping matters here, and sorting integers is several times faster.
    """
    if table.num_rows == 0:
        return table
    user_code = np.asarray(pc.dictionary_encode(table["user"].combine_chunks()).indices)
    keys = [np.asarray(table["pos"]), np.asarray(table["src"])]
    if has_timestamps:
        keys.append(np.asarray(table["timestamp"]))
    keys.append(user_code)
    return table.take(pa.array(np.lexsort(keys)))  # the last key is the primary one


def user_runs(sorted_users: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Start index and length of each user's run in a table sorted by user."""
    users = _as_array(sorted_users)
    n = len(users)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    change = np.asarray(pc.not_equal(users[1:], users[:-1]))
    starts = np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)
    lengths = np.diff(np.append(starts, n))
    return starts, lengths


def dedup(table: pa.Table, mode: str, key: str) -> tuple[pa.Table, int]:
    """Drop repeated (user, item[, timestamp]) interactions of a sorted table, keeping the
    chronologically first or last one."""
    if mode == "none" or table.num_rows == 0:
        return table, 0
    cols = ["user", "item"] + (["timestamp"] if key == "user_item_timestamp" else [])
    agg = "min" if mode == "keep_first" else "max"
    indexed = table.select(cols).append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    kept = indexed.group_by(cols, use_threads=False).aggregate([("_row", agg)]).column(f"_row_{agg}")
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[np.asarray(kept)] = True
    return table.filter(pa.array(keep)), int(table.num_rows - keep.sum())


def core_filter(
    table: pa.Table, drop_items: pa.Array | None, user_core: int, min_seq_len: int
) -> tuple[pa.Table, dict[str, int]]:
    """One round of the filter fixed point on a sorted bucket: remove the interactions with
    ``drop_items`` (items below item_core), then the users below user_core (k-core) or below
    min_seq_len (short users)."""
    stats = {"k_core_interactions": 0, "k_core_users": 0, "short_users": 0, "short_user_interactions": 0}
    if drop_items is not None and len(drop_items) and table.num_rows:
        hit = pc.is_in(table["item"], value_set=drop_items)
        before = table.num_rows
        table = table.filter(pc.invert(hit))
        stats["k_core_interactions"] += before - table.num_rows
    _, lengths = user_runs(table["user"])
    below_core = lengths < user_core
    short = ~below_core & (lengths < min_seq_len)
    stats["k_core_users"] = int(below_core.sum())
    stats["k_core_interactions"] += int(lengths[below_core].sum())
    stats["short_users"] = int(short.sum())
    stats["short_user_interactions"] = int(lengths[short].sum())
    if below_core.any() or short.any():
        table = table.filter(pa.array(np.repeat(~(below_core | short), lengths)))
    return table, stats


def value_counts(values: pa.Array | pa.ChunkedArray) -> pa.Table:
    """Table ``(key, count)`` of the distinct values."""
    counts = _as_array(values).value_counts()
    return pa.table({"key": counts.field("values"), "count": counts.field("counts").cast(pa.int64())})


def user_counts(sorted_table: pa.Table) -> pa.Table:
    """Table ``(key, count)`` of a table sorted by user."""
    starts, lengths = user_runs(sorted_table["user"])
    users = _as_array(sorted_table["user"]).take(pa.array(starts))
    return pa.table({"key": users, "count": pa.array(lengths, pa.int64())})


# ---------------------------------------------------------------------------------------------------
# Sequences and splits


def cold_items(raw_items: pa.Array | pa.ChunkedArray, fraction: float, seed: int) -> np.ndarray:
    """Which items the cold-start split holds out (``split.cold_items_fraction``): a boolean per raw
    id, from a hash of ``"<seed>:<raw id>"``, so every process and every run agrees without state."""
    if fraction <= 0:
        return np.zeros(len(raw_items), dtype=bool)
    keyed = pc.binary_join_element_wise(f"{seed}", _as_array(raw_items).cast(pa.string()), ":")
    return stable_hash(keyed) < np.uint64(int(fraction * 2.0**64))


def drop_cold_interactions(
    table: pa.Table, item_dense: np.ndarray, cold: np.ndarray, min_length: int = 3
) -> tuple[pa.Table, np.ndarray, np.ndarray, dict[str, int]]:
    """Remove the interactions with cold items from a sorted bucket, except each user's last one
    (the leave-one-out test target), then the users left with fewer than ``min_length``.

    ``cold`` flags each interaction. Returns the kept table, the kept ``item_dense``, the kept
    position of each surviving user run (indices into the input runs), and counts.
    """
    starts, lengths = user_runs(table["user"])
    is_last = np.zeros(table.num_rows, dtype=bool)
    is_last[starts + lengths - 1] = True
    keep = ~cold | is_last
    run_of = np.repeat(np.arange(len(starts)), lengths)
    kept_per_run = np.bincount(run_of[keep], minlength=len(starts))
    long_enough = kept_per_run >= min_length
    keep &= long_enough[run_of]
    stats = {
        "cold_interactions_removed": int((cold & ~is_last).sum()),
        "cold_test_targets": int((cold & is_last & long_enough[run_of]).sum()),
        "cold_users_without_rows": int((~long_enough).sum()),
    }
    index = pa.array(np.flatnonzero(keep))
    return table.take(index), item_dense[keep], np.flatnonzero(long_enough), stats


def split_ranges(
    starts: np.ndarray, lengths: np.ndarray, timestamps: np.ndarray | None, split: SplitConfig
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """For each split, the users (indices into ``starts``) that get a row and the end (exclusive,
    in the flat interaction arrays) of that row; every row starts at its user's first interaction.

    leave_one_out: train s[:-2], valid s[:-1], test s. temporal with cutoff T (and optional valid
    cutoff V): test = history before T + the first interaction at/after T; valid = history before V
    + the first at/after V when that is before T (without V: the history before T, whose last item
    is the target); train = history before V (without V: before T minus the valid target).
    """
    users = np.arange(len(starts))
    ends = starts + lengths
    if split.method == "leave_one_out":
        return {"train": (users, ends - 2), "valid": (users, ends - 1), "test": (users, ends)}
    assert timestamps is not None and split.temporal_cutoff is not None
    before_t = _count_before(timestamps, starts, lengths, split.temporal_cutoff)
    out = {}
    has_test = (before_t >= 1) & (before_t < lengths)
    out["test"] = (users[has_test], (starts + before_t + 1)[has_test])
    if split.valid_cutoff is None:
        has_hist = before_t >= 2
        out["train"] = (users[has_hist], (starts + before_t - 1)[has_hist])
        out["valid"] = (users[has_hist], (starts + before_t)[has_hist])
    else:
        before_v = _count_before(timestamps, starts, lengths, split.valid_cutoff)
        has_train = before_v >= 1
        out["train"] = (users[has_train], (starts + before_v)[has_train])
        has_valid = has_train & (before_v < before_t)
        out["valid"] = (users[has_valid], (starts + before_v + 1)[has_valid])
    return out


def _count_before(timestamps: np.ndarray, starts: np.ndarray, lengths: np.ndarray, cutoff: int) -> np.ndarray:
    """Per user, how many interactions happen before ``cutoff`` (a prefix: rows are chronological)."""
    if len(starts) == 0:
        return np.zeros(0, np.int64)
    before = (timestamps < cutoff).astype(np.int64)
    return np.add.reduceat(before, starts)


def _gather_lists(values: pa.Array, starts: np.ndarray, ends: np.ndarray) -> pa.ListArray:
    """ListArray whose row i is ``values[starts[i]:ends[i]]``."""
    lengths = ends - starts
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    index = np.arange(offsets[-1], dtype=np.int64) - np.repeat(offsets[:-1] - starts, lengths)
    assert offsets[-1] < 2**31, "a bucket's rows exceed list<> offsets; use more buckets"
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values.take(pa.array(index)))


def take_rows(table: pa.Table, order: np.ndarray) -> pa.Table:
    """``table.take(order)`` with each list column gathered through its offsets in NumPy: Arrow's
    take of list arrays is several times slower, and the write stage reorders every output row."""
    index = pa.array(order, pa.int64())
    columns = []
    for column in table.columns:
        values = _as_array(column)
        if pa.types.is_list(values.type) and values.null_count == 0:
            offsets = np.asarray(values.offsets, dtype=np.int64)
            columns.append(_gather_lists(values.values, offsets[:-1][order], offsets[1:][order]))
        else:
            columns.append(values.take(index))
    return pa.Table.from_arrays(columns, schema=table.schema)


def build_split_rows(
    table: pa.Table,
    user_dense: np.ndarray,
    item_dense: np.ndarray,
    split: SplitConfig,
    max_seq_len: int,
    has_timestamps: bool,
) -> dict[str, tuple[pa.Table, int]]:
    """One row per user and split from a sorted, filtered bucket, sorted by dense user id.

    ``user_dense`` is the dense id of each user run (in run order), ``item_dense`` the dense id of
    each interaction. Rows keep the most recent ``max_seq_len + 1`` items. Returns, per split, the
    rows and how many older interactions the truncation cut. With ``split.older_windows`` it also
    returns the ``older`` split: what the truncation cut from each train row, as windows (several
    rows per user, see ``older_windows``).
    """
    starts, lengths = user_runs(table["user"])
    assert len(starts) == len(user_dense)
    timestamps = np.asarray(table["timestamp"].combine_chunks().fill_null(0)) if has_timestamps else None
    items = pa.array(item_dense, pa.int64())
    extra = {}
    if "rating" in table.column_names:
        extra["ratings"] = _as_array(table["rating"])
    if "event" in table.column_names:
        extra["events"] = _as_array(table["event"])
    ts = pa.array(timestamps, pa.int64()) if timestamps is not None else None

    def rows(name: str, users: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> pa.Table:
        columns = {
            "user_id": pa.array(user_dense[users], pa.int64()),
            "item_ids": _gather_lists(items, lo, hi),
        }
        if ts is not None:
            columns["timestamps"] = _gather_lists(ts, lo, hi)
        else:
            columns["timestamps"] = pa.nulls(len(users), pa.list_(pa.int64()))
        for key, values in extra.items():
            columns[key] = _gather_lists(values, lo, hi)
        columns["split"] = pa.repeat(pa.scalar(name, pa.string()), len(users))
        return pa.table(columns)

    out = {}
    for name, (users, ends) in split_ranges(starts, lengths, timestamps, split).items():
        order = np.argsort(user_dense[users], kind="stable")
        users, ends = users[order], ends[order]
        row_starts = starts[users]
        cut = np.maximum(row_starts, ends - (max_seq_len + 1))
        num_truncated = int((cut - row_starts).sum())
        out[name] = (rows(name, users, cut, ends), num_truncated)
        if name == "train" and split.older_windows:
            w_users, w_lo, w_hi = older_windows(row_starts, cut, max_seq_len)
            out[OLDER_SPLIT] = (rows(OLDER_SPLIT, users[w_users], w_lo, w_hi), 0)
    return out


def older_windows(
    row_starts: np.ndarray, cuts: np.ndarray, max_seq_len: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows over the interactions ``[row_starts[i], cuts[i]]`` that truncation cut from row i.

    Each window holds at most ``max_seq_len + 1`` items and starts with the previous window's last
    item, and the last window ends with the row's first item (``cuts[i]``), which is not a target
    in the row: every cut interaction but the user's very first is a target exactly once. Returns
    (row index, start, end exclusive) per window, ordered by row, then chronologically.
    """
    span = cuts + 1 - row_starts  # items the windows cover (the row's first item included); 1: none cut
    num = -(-(span - 1) // max_seq_len)  # windows per row: ceil(targets / max_seq_len)
    row = np.repeat(np.arange(len(cuts)), num)
    # Window j of a row, counted from the newest (j = 0), ends after cuts - j * max_seq_len.
    first = np.cumsum(num) - num
    j = np.arange(num.sum()) - np.repeat(first, num)
    hi = cuts[row] + 1 - j * max_seq_len
    lo = np.maximum(row_starts[row], hi - (max_seq_len + 1))
    order = np.lexsort((lo, row))
    return row[order], lo[order], hi[order]


def output_schema(has_rating: bool, has_event: bool) -> pa.Schema:
    """Schema of the split files (docs/data_format.md)."""
    fields = [
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("item_ids", pa.list_(pa.int64())),
        pa.field("timestamps", pa.list_(pa.int64()), nullable=True),
    ]
    if has_rating:
        fields.append(pa.field("ratings", pa.list_(pa.float32())))
    if has_event:
        fields.append(pa.field("events", pa.list_(pa.string())))
    fields.append(pa.field("split", pa.string()))
    return pa.schema(fields)
