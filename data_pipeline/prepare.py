"""The ``prepare`` job: raw interaction logs -> sharded Parquet sequences (docs/data_format.md).

    python -m data_pipeline prepare --config configs/data/ml100k.yaml
    python -m data_pipeline prepare --config configs/data/ml1m.yaml output.dir=data/prepared/ml1m max_seq_len=50
    python -m data_pipeline prepare --config configs/data/amazon_beauty.yaml ray.address=auto  # running cluster

Run from the project root: relative paths in the config resolve against the working directory.
Without ``ray.address`` an embedded local Ray is started (and shut down at the end).

Stages, each a Ray Data job whose tasks do vectorized Arrow/NumPy work:

1. read     one task per ~``ray.read_chunk_bytes`` of input: parse, validate (bad rows -> rejects),
            per-interaction filters, hash-partition by user into ``num_buckets`` bucket files.
2. clean    one task per bucket: sort per user (timestamp, file, row), dedup, drop users below
            user_core / min_seq_len; returns item and user counts.
3. k-core   while some item has fewer than item_core interactions: drop those items everywhere,
            then the users that fall below their threshold (one Ray Data job per round).
4. vocab    (driver) dense ids by descending count, ties by raw id; vocab/*.parquet.
5. rows     one task per bucket: dense ids (binary search over the vocabulary's sorted hashes),
            per-user split rows truncated to max_seq_len + 1.
6. write    one task per output file: the users of a dense-id range, sorted, zstd Parquet.

Memory of a task is bounded by one read chunk or one bucket (``ray.bucket_bytes`` of input), not by
the input size; what grows is the vocabularies, as Arrow/NumPy arrays in the driver and (sorted
hashes) in Ray's object store, never as a per-task hash table (docs/data_pipeline.md, "Memory").
Intermediate files live in ``<output.dir>/_work`` (removed at the end), so on a
multi-node cluster output.dir must be on a shared file system. ``manifest.json`` is written last.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import glob
import logging
import math
import os
import shutil
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cluster.config import ConfigError, load_config, save_config, to_dict
from cluster.log import setup_logging
from data_pipeline import metadata as item_metadata
from data_pipeline.config import PrepareConfig, RayConfig
from data_pipeline.readers import ReadTask, SourceFile, plan_read_tasks, read_records, resolve_sources
from data_pipeline.transform import (
    OLDER_SPLIT,
    SPLITS,
    HashedVocab,
    bucket_of,
    build_split_rows,
    cold_items,
    core_filter,
    dedup,
    dense_ids_of,
    drop_cold_interactions,
    hashed_vocab,
    interaction_schema,
    output_schema,
    record_filters,
    sort_interactions,
    take_rows,
    user_counts,
    user_runs,
    validate_records,
    value_counts,
)
from data_pipeline.writer import (
    WORK_DIR,
    claim_output_dir,
    fingerprint_inputs,
    read_arrow,
    write_arrow,
    write_manifest,
    write_parquet,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
REJECTS_PER_FILE = 1_000_000
# Every task returns a long table of counts: (task, kind, key, count).
_RESULT_SCHEMA = pa.schema(
    [("task", pa.int64()), ("kind", pa.string()), ("key", pa.string()), ("count", pa.int64())]
)
_FILE_SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("path", pa.string()),
        ("num_rows", pa.int64()),
        ("num_interactions", pa.int64()),
        ("sha256", pa.string()),
    ]
)
# Columns of the split files with few distinct values (Parquet column paths).
_DICTIONARY_COLUMNS = ["split", "events.list.element"]
_REJECT_SCHEMA = pa.schema(
    [("source_file", pa.string()), ("row_number", pa.int64()), ("reason", pa.string()), ("raw", pa.string())]
)


def _result(task: int, kind: str, counts: dict[str, int] | pa.Table) -> pa.Table:
    """Counts as rows of the common result table (a dict, or a ``(key, count)`` table)."""
    if isinstance(counts, pa.Table):
        keys, values = counts["key"], counts["count"]
    else:
        keys = pa.array(list(counts), pa.string())
        values = pa.array([int(v) for v in counts.values()], pa.int64())
    n = len(keys)
    return pa.table(
        {
            "task": pa.repeat(pa.scalar(task, pa.int64()), n),
            "kind": pa.repeat(pa.scalar(kind, pa.string()), n),
            "key": keys,
            "count": values,
        },
        schema=_RESULT_SCHEMA,
    )


def _of_kind(results: pa.Table, kind: str) -> pa.Table:
    return results.filter(pc.equal(results["kind"], kind))


def _stats(results: pa.Table, kind: str = "stat") -> Counter:
    """Sum the ``kind`` rows of a result table by key."""
    rows = _of_kind(results, kind)
    out: Counter = Counter()
    for key, count in zip(rows["key"].to_pylist(), rows["count"].to_pylist()):
        out[key] += count
    return out


def _sum_counts(tables: list[pa.Table]) -> pa.Table:
    """Merge ``(key, count)`` tables by summing the counts of equal keys."""
    if not tables:
        return pa.table({"key": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
    merged = pa.concat_tables(tables).group_by("key", use_threads=False).aggregate([("count", "sum")])
    return merged.rename_columns(["key", "count"])


def _run_tasks(
    fn: Callable[..., pa.Table], items: list[dict[str, Any]], **fn_kwargs: Any
) -> Iterator[pa.Table]:
    """Run ``fn`` once per item as a Ray Data map task (one item per block); yields the tasks'
    output tables as they finish."""
    import ray.data

    if not items:
        return
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(fn, batch_size=1, batch_format="pyarrow", num_cpus=1, fn_kwargs=fn_kwargs)
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _collect(
    fn: Callable[..., pa.Table], items: list[dict[str, Any]], result_schema: pa.Schema, **fn_kwargs: Any
) -> pa.Table:
    """All output rows of ``_run_tasks`` in one table (for small outputs)."""
    tables = [t.cast(result_schema) for t in _run_tasks(fn, items, **fn_kwargs) if t.num_rows]
    return pa.concat_tables(tables) if tables else result_schema.empty_table()


@dataclass
class _BucketResults:
    stats: Counter
    item_counts: pa.Table  # (key, count), summed over buckets
    user_counts: pa.Table  # (key, count); a user never spans two buckets


def _collect_bucket_results(
    fn: Callable[..., pa.Table], buckets: list[dict[str, Any]], **fn_kwargs: Any
) -> _BucketResults:
    """Run a per-bucket stage. Item counts are merged as results arrive, so the driver holds about
    one count per distinct item rather than one per bucket and item."""
    stats: Counter = Counter()
    item_parts: list[pa.Table] = []
    user_parts: list[pa.Table] = []
    for table in _run_tasks(fn, buckets, **fn_kwargs):
        table = table.cast(_RESULT_SCHEMA)
        stats.update(_stats(table))
        item_parts.append(_of_kind(table, "item").select(["key", "count"]))
        user_parts.append(_of_kind(table, "user").select(["key", "count"]))
        if len(item_parts) >= 16:
            item_parts = [_sum_counts(item_parts)]
    users = pa.concat_tables(user_parts) if user_parts else _sum_counts([])
    return _BucketResults(stats, _sum_counts(item_parts), users)


def _read_arrow_files(paths: list[str], schema: pa.Schema) -> pa.Table:
    if not paths:
        return schema.empty_table()
    return pa.concat_tables([read_arrow(p) for p in paths]).cast(schema)


def _bucket_dir(work: Path, stage: str, bucket: int) -> Path:
    return work / stage / f"b{bucket:05d}"


def _clean_path(work: str | Path, round_: int, bucket: int) -> Path:
    """A bucket after k-core round ``round_`` (0: the clean stage). Each round writes new files, so
    a retried task reads the same input as the first attempt."""
    return Path(work) / "clean" / f"r{round_:03d}" / f"b{bucket:05d}.arrow"


# ---------------------------------------------------------------------------------------------------
# Ray tasks (module-level so workers import them by name)


def _read_task(
    batch: pa.Table,
    *,
    sources: list[SourceFile],
    cfg: PrepareConfig,
    work: str,
    num_buckets: int,
    has_rating: bool,
    has_event: bool,
) -> pa.Table:
    task = ReadTask(**batch.to_pylist()[0])
    src = sources[task.file_index]
    work_dir = Path(work)
    stats: Counter = Counter()
    rejects: Counter = Counter()
    for piece, records in enumerate(read_records(src, task, cfg.ray.read_chunk_bytes)):
        stats["num_lines"] += records.num_lines
        stats["num_blank"] += records.num_blank
        stats["num_records"] += records.num_records
        valid = validate_records(records, src.index, cfg.input.timestamp_format, has_rating, has_event)
        lines = np.concatenate([np.asarray(records.rejects["line"], np.int64), valid.reject_line])
        reasons = records.rejects["reason"] + valid.reject_reason
        if len(lines):
            rejects.update(reasons)
            table = pa.table(
                {
                    "line": pa.array(lines, pa.int64()),
                    "reason": pa.array(reasons, pa.string()),
                    "raw": pa.array(records.rejects["raw"] + valid.reject_raw, pa.string()),
                }
            )
            write_arrow(table, work_dir / "rejects" / f"t{task.task_id:06d}-p{piece:05d}.arrow")
        stats["num_interactions_read"] += valid.table.num_rows
        table, removed = record_filters(valid.table, cfg.filters)
        stats.update({f"filtered_{k}": v for k, v in removed.items()})
        stats["num_valid"] += table.num_rows
        if table.num_rows == 0:
            continue
        buckets = bucket_of(table["user"], num_buckets)
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        present = np.unique(sorted_buckets)
        lo = np.searchsorted(sorted_buckets, present, side="left")
        hi = np.searchsorted(sorted_buckets, present, side="right")
        for b, start, end in zip(present, lo, hi):
            part = table.take(pa.array(order[start:end]))
            write_arrow(
                part, _bucket_dir(work_dir, "parsed", int(b)) / f"t{task.task_id:06d}-p{piece:05d}.arrow"
            )
    return pa.concat_tables([_result(task.task_id, "stat", stats), _result(task.task_id, "reject", rejects)])


def _clean_task(
    batch: pa.Table, *, cfg: PrepareConfig, work: str, schema: pa.Schema, has_timestamps: bool
) -> pa.Table:
    bucket = int(batch["bucket"][0].as_py())
    parsed_dir = _bucket_dir(Path(work), "parsed", bucket)
    table = _read_arrow_files(sorted(glob.glob(str(parsed_dir / "*.arrow"))), schema)
    table = sort_interactions(table, has_timestamps)
    table, num_dup = dedup(table, cfg.filters.dedup, cfg.filters.dedup_key)
    table, stats = core_filter(table, None, cfg.filters.user_core, cfg.filters.min_seq_len)
    stats["dedup"] = num_dup
    write_arrow(table, _clean_path(work, 0, bucket))
    return pa.concat_tables(
        [
            _result(bucket, "stat", stats),
            _result(bucket, "item", value_counts(table["item"])),
            _result(bucket, "user", user_counts(table)),
        ]
    )


def _core_task(
    batch: pa.Table, *, cfg: PrepareConfig, work: str, schema: pa.Schema, drop_items: Any, round_: int
) -> pa.Table:
    import ray

    bucket = int(batch["bucket"][0].as_py())
    table = read_arrow(_clean_path(work, round_ - 1, bucket)).cast(schema)
    table, stats = core_filter(table, ray.get(drop_items), cfg.filters.user_core, cfg.filters.min_seq_len)
    write_arrow(table, _clean_path(work, round_, bucket))
    return pa.concat_tables(
        [
            _result(bucket, "stat", stats),
            _result(bucket, "item", value_counts(table["item"])),
            _result(bucket, "user", user_counts(table)),
        ]
    )


def _rows_task(
    batch: pa.Table,
    *,
    cfg: PrepareConfig,
    work: str,
    schema: pa.Schema,
    users_vocab: Any,
    items_vocab: Any,
    has_timestamps: bool,
    out_schema: pa.Schema,
    round_: int,
) -> pa.Table:
    import ray

    bucket = int(batch["bucket"][0].as_py())
    table = read_arrow(_clean_path(work, round_, bucket)).cast(schema)
    starts, _ = user_runs(table["user"])
    run_users = table["user"].combine_chunks().take(pa.array(starts))
    user_dense = dense_ids_of(run_users, ray.get(users_vocab))
    item_dense = dense_ids_of(table["item"], ray.get(items_vocab))
    stats: dict[str, int] = {}
    if cfg.split.cold_items_fraction > 0:
        cold = cold_items(table["item"], cfg.split.cold_items_fraction, cfg.split.cold_items_seed)
        table, item_dense, kept_runs, cold_stats = drop_cold_interactions(table, item_dense, cold)
        user_dense = user_dense[kept_runs]
        stats.update(cold_stats)
    rows = build_split_rows(table, user_dense, item_dense, cfg.split, cfg.max_seq_len, has_timestamps)
    for name, (split_rows, num_truncated) in rows.items():
        write_arrow(split_rows.cast(out_schema), Path(work) / "rows" / name / f"b{bucket:05d}.arrow")
        stats[f"{name}.num_rows"] = split_rows.num_rows
        stats[f"{name}.num_interactions"] = int(
            pc.sum(pc.list_value_length(split_rows["item_ids"])).as_py() or 0
        )
        stats[f"{name}.num_truncated"] = num_truncated
    return _result(bucket, "stat", stats)


def _write_task(
    batch: pa.Table, *, work: str, out: str, row_group_size: int, out_schema: pa.Schema
) -> pa.Table:
    spec = batch.to_pylist()[0]
    split, shard, lo, hi, write_empty = (spec[k] for k in ("split", "shard", "lo", "hi", "write_empty"))
    parts = []
    for path in sorted(glob.glob(str(Path(work) / "rows" / split / "*.arrow"))):
        # Each bucket's rows are sorted by user_id: slice the range out of the memory-mapped file.
        rows = read_arrow(path)
        user_ids = np.asarray(rows["user_id"])
        start, end = np.searchsorted(user_ids, [lo, hi], side="right")
        parts.append(rows.slice(start, end - start))
    table = pa.concat_tables(parts).cast(out_schema) if parts else out_schema.empty_table()
    if table.num_rows == 0 and not write_empty:
        return _FILE_SCHEMA.empty_table()
    # One chunk per column: Parquet page boundaries then depend on the data only, not on how the
    # table happened to be chunked, so the same data gives the same bytes.
    table = table.combine_chunks()
    table = take_rows(table, np.argsort(np.asarray(table["user_id"]), kind="stable"))
    rel = f"{split}/part-{shard:05d}.parquet"
    # Dictionary pages only for the few distinct strings: for ids, timestamps and ratings Parquet
    # builds a dictionary, overflows it and falls back, which doubles the write time and the size.
    digest = write_parquet(
        table, Path(out) / rel, row_group_size, "zstd", schema=out_schema, use_dictionary=_DICTIONARY_COLUMNS
    )
    num_interactions = int(pc.sum(pc.list_value_length(table["item_ids"])).as_py() or 0)
    row = {"split": split, "path": rel, "num_rows": table.num_rows, "num_interactions": num_interactions}
    return pa.Table.from_pylist([{**row, "sha256": digest}], schema=_FILE_SCHEMA)


# ---------------------------------------------------------------------------------------------------
# Driver


@contextlib.contextmanager
def ray_session(cfg: RayConfig) -> Iterator[None]:
    """Use the running Ray (tests, notebooks), join ``cfg.address``, or start a local one."""
    import ray
    import ray.data

    started = False
    if not ray.is_initialized():
        if cfg.address:
            ray.init(address=cfg.address, logging_level=logging.WARNING)
        else:
            # Ray runs its workers at nice 15 by default, behind every other process of the machine;
            # the job's tasks are the work here, so they run at the driver's priority. "local": a new
            # instance even when a cluster started with `ray start` runs here (a bare ray.init() would
            # join that one, and refuse num_cpus).
            ray.init(
                address="local",
                num_cpus=cfg.num_cpus,
                include_dashboard=False,
                logging_level=logging.WARNING,
                _system_config={"worker_niceness": 0},
            )
        started = True
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _num_buckets(cfg: RayConfig, sources: list[SourceFile]) -> int:
    if cfg.num_buckets is not None:
        return cfg.num_buckets
    # Compressed text and Parquet expand in memory; a rough factor keeps buckets near bucket_bytes.
    size = sum(s.size * (4 if s.compressed or s.kind == "parquet" else 1) for s in sources)
    return max(1, min(65536, math.ceil(size / cfg.bucket_bytes)))


def _check_output_outside_inputs(sources: list[SourceFile], extra: list[str], out: Path) -> None:
    out_real = os.path.realpath(out)
    for path in [s.path for s in sources] + extra:
        if os.path.realpath(path).startswith(out_real + os.sep):
            raise ValueError(
                f"input file '{path}' is inside output.dir '{out}', which is cleared at the start; "
                "choose another output.dir"
            )


def _consolidate_rejects(
    work: Path, out: Path, tasks: list[ReadTask], sources: list[SourceFile], lines_before: dict[int, int]
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Gather the read tasks' rejects into ``rejects/rejects-*.parquet`` with 1-based row numbers
    of the source file; returns the files and the first example of each reason."""
    files: list[dict[str, Any]] = []
    examples: dict[str, dict[str, Any]] = {}
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        rel = f"rejects/rejects-{len(files):05d}.parquet"
        table = pa.concat_tables(pending).combine_chunks()
        digest = write_parquet(table, out / rel, 65536, "zstd", schema=_REJECT_SCHEMA)
        files.append({"path": rel, "num_rows": table.num_rows, "sha256": digest})
        pending, pending_rows = [], 0

    for task in tasks:
        paths = sorted(glob.glob(str(work / "rejects" / f"t{task.task_id:06d}-p*.arrow")))
        if not paths:
            continue
        table = pa.concat_tables([read_arrow(p) for p in paths])
        table = table.take(pc.sort_indices(table, sort_keys=[("line", "ascending")]))
        source = sources[task.file_index].path
        row_number = pc.add(table["line"], lines_before[task.task_id] + 1)
        table = pa.table(
            {
                "source_file": pa.repeat(pa.scalar(source, pa.string()), table.num_rows),
                "row_number": row_number,
                "reason": table["reason"],
                "raw": table["raw"],
            }
        )
        for reason in pc.unique(table["reason"]).to_pylist():
            if reason not in examples:
                i = pc.index(table["reason"], reason).as_py()
                examples[reason] = {
                    "file": source,
                    "row": table["row_number"][i].as_py(),
                    "raw": table["raw"][i].as_py(),
                }
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= REJECTS_PER_FILE:
            flush()
    flush()
    return files, examples


def _reject_error(
    out: Path,
    num_rejected: int,
    num_records: int,
    max_fraction: float,
    by_reason: dict[str, int],
    by_file: dict[str, tuple[int, int]],
    examples: dict[str, dict[str, Any]],
) -> ValueError:
    worst_file, (file_rejects, file_records) = max(by_file.items(), key=lambda kv: kv[1][0])
    lines = [
        f"rejected {num_rejected:,} of {num_records:,} input records ({num_rejected / max(num_records, 1):.2%}), "
        f"more than max_reject_fraction={max_fraction}.",
        f"Worst file: {worst_file} ({file_rejects:,} of its {file_records:,} records rejected).",
        "Reasons:",
    ]
    for reason, count in sorted(by_reason.items(), key=lambda kv: -kv[1])[:5]:
        ex = examples.get(reason, {})
        lines.append(f"  {reason}: {count:,} (e.g. {ex.get('file')} row {ex.get('row')}: {ex.get('raw')!r})")
    lines.append(
        f"Every rejected row is in {out / 'rejects'}. Fix the input, or accept the loss by raising the "
        f"config key max_reject_fraction (e.g. max_reject_fraction={min(1.0, round(num_rejected / max(num_records, 1) + 0.01, 2))})."
    )
    return ValueError("\n".join(lines))


def _vocab(counts: pa.Table) -> pa.Table:
    """Dense ids 1..n by descending count, ties by raw id (UTF-8 byte order)."""
    ordered = counts.sort_by([("count", "descending"), ("key", "ascending")])
    n = ordered.num_rows
    return pa.table(
        {
            "raw_id": ordered["key"].combine_chunks(),
            "dense_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
            "count": ordered["count"].combine_chunks().cast(pa.int64()),
        }
    )


def _lookup_vocab(vocab: pa.Table) -> HashedVocab | pa.Array:
    """What the rows tasks look dense ids up in: sorted hashes (O(ids of the task) per task), or
    on a 64-bit hash collision the raw ids (each task then builds a hash table of all of them)."""
    hashed = hashed_vocab(vocab["raw_id"])
    if hashed is None:
        logger.warning(
            "two raw ids of a %d-id vocabulary share a 64-bit hash: dense ids are looked up by value",
            vocab.num_rows,
        )
        return vocab["raw_id"].combine_chunks()
    return hashed


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("genrec-pipeline")
    except Exception:  # not installed (e.g. run from a source tree)
        return "unknown"


def prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the whole job; returns the manifest (also written to ``<output.dir>/manifest.json``)."""
    t_start = time.perf_counter()
    out = Path(cfg.output.dir)
    sources = resolve_sources(cfg.input)
    meta_path = [p for p in (cfg.input.item_metadata, cfg.input.item_metadata_attribute_names) if p]
    _check_output_outside_inputs(sources, meta_path, out)
    metadata = item_metadata.read_item_metadata(cfg.input) if cfg.input.item_metadata else None

    claim_output_dir(out, cfg.output.overwrite)
    save_config(cfg, out / "config.yaml")
    out = out.resolve()  # tasks may run in another working directory
    # Hashing the inputs (seconds per GB) overlaps the stages: the driver thread mostly waits on Ray,
    # and hashlib releases the GIL.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        fingerprinted = pool.submit(fingerprint_inputs, [s.path for s in sources] + meta_path)
        try:
            with ray_session(cfg.ray):
                manifest = _run_stages(cfg, sources, out, metadata)
        finally:
            shutil.rmtree(out / WORK_DIR, ignore_errors=True)
        fingerprint, input_files = fingerprinted.result()
    manifest.update(
        {
            "config": to_dict(cfg),
            "input_fingerprint": fingerprint,
            "inputs": input_files,
            "created_by": "genrec-pipeline data_pipeline.prepare",
            "version": _package_version(),
        }
    )
    write_manifest(out, manifest)
    logger.info(
        "done in %.1fs: %s users, %s items, %s interactions -> %s",
        time.perf_counter() - t_start,
        f"{manifest['num_users']:,}",
        f"{manifest['num_items']:,}",
        f"{manifest['num_interactions']:,}",
        out,
    )
    return manifest


def _run_stages(
    cfg: PrepareConfig, sources: list[SourceFile], out: Path, metadata: dict[str, dict[str, Any]] | None
) -> dict[str, Any]:
    """Stages 1-6 (see the module docstring); returns the manifest without config and inputs."""
    import ray

    work = out / WORK_DIR
    fields = set(sources[0].fields)
    has_timestamps, has_rating, has_event = "timestamp" in fields, "rating" in fields, "event" in fields
    schema = interaction_schema(has_rating, has_event)
    out_schema = output_schema(has_rating, has_event)

    # 1. read ------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    tasks = plan_read_tasks(sources, cfg.ray.read_chunk_bytes)
    num_buckets = _num_buckets(cfg.ray, sources)
    logger.info(
        "read: %d files (%s bytes) in %d tasks, %d user buckets",
        len(sources),
        f"{sum(s.size for s in sources):,}",
        len(tasks),
        num_buckets,
    )
    results = _collect(
        _read_task,
        [asdict(t) for t in tasks],
        _RESULT_SCHEMA,
        sources=sources,
        cfg=cfg,
        work=str(work),
        num_buckets=num_buckets,
        has_rating=has_rating,
        has_event=has_event,
    )
    per_task = defaultdict(Counter)
    for task_id, kind, key, count in zip(*(results[c].to_pylist() for c in ("task", "kind", "key", "count"))):
        per_task[task_id][(kind, key)] += count
    lines_before: dict[int, int] = {}
    file_lines: Counter = Counter()
    file_records: Counter = Counter()
    file_rejects: Counter = Counter()
    for task in tasks:  # tasks of a file are in file order
        c = per_task[task.task_id]
        lines_before[task.task_id] = file_lines[task.file_index]
        file_lines[task.file_index] += c[("stat", "num_lines")]
        file_records[task.file_index] += c[("stat", "num_records")]
        file_rejects[task.file_index] += sum(v for (kind, _), v in c.items() if kind == "reject")
    for src in sources:
        if file_records[src.index] == 0:
            raise ValueError(
                f"input file '{src.path}' has no data rows"
                + (" (only a header)" if src.has_header else " (only blank lines)")
            )
    stats = _stats(results)
    by_reason = dict(sorted(_stats(results, "reject").items()))
    num_records, num_rejected = stats["num_records"], sum(by_reason.values())
    num_blank = stats["num_blank"]
    reject_files, examples = _consolidate_rejects(work, out, tasks, sources, lines_before)
    logger.info(
        "read: %s records, %s rejected (%.3f%%)%s, %s blank lines [%.1fs]",
        f"{num_records:,}",
        f"{num_rejected:,}",
        100 * num_rejected / max(num_records, 1),
        f" {by_reason}" if by_reason else "",
        f"{stats['num_blank']:,}",
        time.perf_counter() - t0,
    )
    if num_rejected > cfg.max_reject_fraction * num_records:
        by_file = {s.path: (file_rejects[s.index], file_records[s.index]) for s in sources}
        raise _reject_error(
            out, num_rejected, num_records, cfg.max_reject_fraction, by_reason, by_file, examples
        )
    filtered = {
        "min_rating": stats["filtered_min_rating"],
        "events": stats["filtered_events"],
    }
    num_valid = stats["num_interactions_read"]

    # 2. clean -------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    buckets = [{"bucket": b} for b in range(num_buckets)]
    counts = _collect_bucket_results(
        _clean_task, buckets, cfg=cfg, work=str(work), schema=schema, has_timestamps=has_timestamps
    )
    shutil.rmtree(work / "parsed", ignore_errors=True)  # in the driver: a retried task still finds its input
    filtered["dedup"] = counts.stats["dedup"]
    for key in ("k_core_interactions", "k_core_users", "short_users", "short_user_interactions"):
        filtered[key] = counts.stats[key]
    logger.info(
        "clean: %s duplicates removed, %s short users [%.1fs]",
        f"{filtered['dedup']:,}",
        f"{filtered['short_users']:,}",
        time.perf_counter() - t0,
    )

    # 3. k-core --------------------------------------------------------------------------------------
    rounds = 0
    while cfg.filters.item_core > 1:
        item_counts = counts.item_counts
        drop = item_counts.filter(pc.less(item_counts["count"], cfg.filters.item_core))["key"]
        if len(drop) == 0:
            break
        t0 = time.perf_counter()
        rounds += 1
        drop_ref = ray.put(drop.combine_chunks())
        counts = _collect_bucket_results(
            _core_task, buckets, cfg=cfg, work=str(work), schema=schema, drop_items=drop_ref, round_=rounds
        )
        shutil.rmtree(work / "clean" / f"r{rounds - 1:03d}")
        for key in ("k_core_interactions", "k_core_users", "short_users", "short_user_interactions"):
            filtered[key] += counts.stats[key]
        logger.info(
            "k-core round %d: dropped %s items, %s users; %s interactions left [%.1fs]",
            rounds,
            f"{len(drop):,}",
            f"{counts.stats['k_core_users'] + counts.stats['short_users']:,}",
            f"{pc.sum(counts.item_counts['count']).as_py() or 0:,}",
            time.perf_counter() - t0,
        )

    # 4. vocab -----------------------------------------------------------------------------------------
    items_vocab, users_vocab = _vocab(counts.item_counts), _vocab(counts.user_counts)
    num_interactions = int(pc.sum(items_vocab["count"]).as_py() or 0)
    assert num_interactions == num_valid - sum(
        filtered[k]
        for k in ("min_rating", "events", "dedup", "k_core_interactions", "short_user_interactions")
    ), "every removed interaction is counted"
    if num_interactions == 0:
        raise ValueError(
            f"no interactions left after filtering (read {num_valid:,} valid interactions; removed {filtered}). "
            "Relax filters.* (min_rating, user_core, item_core, min_seq_len)"
        )
    vocab_paths = {"items": "vocab/items.parquet", "users": "vocab/users.parquet"}
    write_parquet(items_vocab, out / vocab_paths["items"], 65536)
    write_parquet(users_vocab, out / vocab_paths["users"], 65536)
    logger.info("vocab: %s users, %s items", f"{users_vocab.num_rows:,}", f"{items_vocab.num_rows:,}")
    metadata_entry = None
    if metadata is not None:
        table, num_with_meta = item_metadata.metadata_table(items_vocab["raw_id"], metadata)
        write_parquet(table, out / "items" / "metadata.parquet", cfg.output.row_group_size)
        metadata_entry = {"path": "items/metadata.parquet", "num_items_with_metadata": num_with_meta}
        logger.info(
            "item metadata: %s of %s items have metadata", f"{num_with_meta:,}", f"{table.num_rows:,}"
        )

    # 5. rows ------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    split_names = SPLITS + ((OLDER_SPLIT,) if cfg.split.older_windows else ())
    stats = _stats(
        _collect(
            _rows_task,
            buckets,
            _RESULT_SCHEMA,
            cfg=cfg,
            work=str(work),
            schema=schema,
            users_vocab=ray.put(_lookup_vocab(users_vocab)),
            items_vocab=ray.put(_lookup_vocab(items_vocab)),
            has_timestamps=has_timestamps,
            out_schema=out_schema,
            round_=rounds,
        )
    )
    logger.info(
        "rows: %s [%.1fs]",
        ", ".join(f"{s} {stats[f'{s}.num_rows']:,}" for s in split_names),
        time.perf_counter() - t0,
    )

    cold_entry = None
    if cfg.split.cold_items_fraction > 0:
        is_cold = cold_items(items_vocab["raw_id"], cfg.split.cold_items_fraction, cfg.split.cold_items_seed)
        cold_ids = pa.table({"dense_id": pa.array(np.flatnonzero(is_cold) + 1, pa.int64())})
        write_parquet(cold_ids, out / "vocab" / "cold_items.parquet", 65536)
        cold_entry = {
            "path": "vocab/cold_items.parquet",
            "fraction": cfg.split.cold_items_fraction,
            "seed": cfg.split.cold_items_seed,
            "num_items": cold_ids.num_rows,
            **{
                k: stats[k]
                for k in ("cold_interactions_removed", "cold_test_targets", "cold_users_without_rows")
            },
        }
        logger.info(
            "cold start: %s of %s items held out of training; %s interactions removed; %s test targets are "
            "cold; %s users left without rows",
            f"{cold_ids.num_rows:,}",
            f"{items_vocab.num_rows:,}",
            f"{stats['cold_interactions_removed']:,}",
            f"{stats['cold_test_targets']:,}",
            f"{stats['cold_users_without_rows']:,}",
        )

    # 6. write -----------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    num_users = users_vocab.num_rows
    per_file = cfg.output.rows_per_file
    empty_splits = {s for s in split_names if stats[f"{s}.num_rows"] == 0}
    specs = []
    for split in split_names:
        # A split without rows still gets one (empty) file, so readers find its schema.
        num_shards = 1 if split in empty_splits else max(1, math.ceil(num_users / per_file))
        for shard in range(num_shards):
            specs.append(
                {
                    "split": split,
                    "shard": shard,
                    "lo": shard * per_file,
                    "hi": (shard + 1) * per_file,
                    "write_empty": split in empty_splits,
                }
            )
    written = _collect(
        _write_task,
        specs,
        _FILE_SCHEMA,
        work=str(work),
        out=str(out),
        row_group_size=cfg.output.row_group_size,
        out_schema=out_schema,
    ).sort_by("path")
    splits = {}
    for split in split_names:
        files = [
            {k: v for k, v in f.items() if k != "split"} for f in written.to_pylist() if f["split"] == split
        ]
        assert sum(f["num_rows"] for f in files) == stats[f"{split}.num_rows"], "every row is written once"
        splits[split] = {
            "num_rows": stats[f"{split}.num_rows"],
            "num_interactions": stats[f"{split}.num_interactions"],
            "num_truncated": stats[f"{split}.num_truncated"],
            "files": files,
        }
    logger.info(
        "write: %d files [%.1fs]", sum(len(s["files"]) for s in splits.values()), time.perf_counter() - t0
    )

    return {
        "schema_version": SCHEMA_VERSION,
        "num_users": num_users,
        "num_items": items_vocab.num_rows,
        "num_interactions": num_interactions,
        "num_input_records": num_records,
        "num_blank_lines": num_blank,
        "num_rejected": num_rejected,
        "rejected_by_reason": by_reason,
        "reject_files": reject_files,
        "filtered": filtered,
        "k_core_rounds": rounds,
        "max_seq_len": cfg.max_seq_len,
        "has_timestamps": has_timestamps,
        "has_ratings": has_rating,
        "has_events": has_event,
        "split_method": cfg.split.method,
        "splits": splits,
        "vocab": vocab_paths,
        "item_metadata": metadata_entry,
        "cold_items": cold_entry,
        "num_buckets": num_buckets,
    }


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline prepare --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline prepare", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--config", help="YAML file with PrepareConfig keys (see configs/data/)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. output.dir=data/x")
    args = parser.parse_args(argv)
    setup_logging()
    import ray.data  # noqa: F401  (configures its loggers on import; quiet them after)

    # Our stage lines carry the counts and timings; Ray Data's per-dataset lines are noise here.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        cfg = load_config(PrepareConfig, args.config, args.overrides)
        manifest = prepare(cfg)
    except (ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        return 2 if isinstance(exc, ConfigError) else 1
    print(
        f"prepared {manifest['num_users']:,} users, {manifest['num_items']:,} items, "
        f"{manifest['num_interactions']:,} interactions -> {cfg.output.dir}",
        file=sys.stderr,
    )
    return 0
