"""Tests for train.reader, train.batch and the trainer's input/target cut: collation, partitioning, resume."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import train.reader as reader_module
from train.batch import SequenceBatch, collate_rows, split_inputs_targets, split_last
from train.reader import SequenceDataset, load_manifest

SPLITS = ("train", "valid", "test")


def write_test_shards(
    tmp_path: Path,
    num_users: int = 50,
    num_files: int = 3,
    row_group_size: int = 4,
    max_seq_len: int = 12,
    num_items: int = 40,
    with_timestamps: bool = True,
    seed: int = 0,
) -> tuple[Path, dict[str, dict[int, tuple[list[int], list[int] | None]]]]:
    """A small prepared-data directory (docs/data_format.md) and the rows it holds, per split.

    Users get random sequences of 3..max_seq_len+1 items; leave-one-out splits. Rows are sorted by
    user id and spread over ``num_files`` files with row groups of ``row_group_size`` rows.
    """
    rng = np.random.default_rng(seed)
    data_dir = tmp_path / "prepared"
    expected: dict[str, dict[int, tuple[list[int], list[int] | None]]] = {s: {} for s in SPLITS}
    for user in range(1, num_users + 1):
        n = int(rng.integers(3, max_seq_len + 2))
        items = rng.integers(1, num_items + 1, size=n).tolist()
        ts = np.sort(rng.integers(1_000_000, 2_000_000, size=n)).tolist()
        for split, cut in (("train", n - 2), ("valid", n - 1), ("test", n)):
            expected[split][user] = (items[:cut], ts[:cut] if with_timestamps else None)
    manifest: dict = {
        "schema_version": 1,
        "num_users": num_users,
        "num_items": num_items,
        "max_seq_len": max_seq_len,
        "has_timestamps": with_timestamps,
        "splits": {},
    }
    for split in SPLITS:
        (data_dir / split).mkdir(parents=True)
        users = sorted(expected[split])
        chunks = np.array_split(np.array(users), num_files)
        files = []
        for i, chunk in enumerate(chunks):
            rows = [expected[split][int(u)] for u in chunk]
            table = pa.table(
                {
                    "user_id": pa.array(chunk, pa.int64()),
                    "item_ids": pa.array([r[0] for r in rows], pa.list_(pa.int64())),
                    "timestamps": pa.array([r[1] for r in rows], pa.list_(pa.int64())),
                    "split": pa.array([split] * len(chunk), pa.string()),
                }
            )
            rel = f"{split}/part-{i:05d}.parquet"
            pq.write_table(table, data_dir / rel, row_group_size=row_group_size)
            files.append({"path": rel, "num_rows": len(chunk), "sha256": "not-checked"})
        manifest["splits"][split] = {
            "num_rows": len(users),
            "num_interactions": sum(len(expected[split][u][0]) for u in users),
            "files": files,
        }
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    return data_dir, expected


def rows_of(batch: SequenceBatch) -> list[tuple[int, tuple[int, ...]]]:
    """(user, items) per row, via the jagged offsets (the reference check of collation)."""
    off = batch.offsets.tolist()
    items = batch.item_ids.tolist()
    return [(u, tuple(items[off[i] : off[i + 1]])) for i, u in enumerate(batch.user_ids.tolist())]


def key_of(batches: list[SequenceBatch]) -> list[list[tuple[int, tuple[int, ...]]]]:
    return [rows_of(b) for b in batches]


def iterate_as_worker(monkeypatch, ds: SequenceDataset, worker: int, num_workers: int) -> list[SequenceBatch]:
    """Run ``iter(ds)`` as DataLoader worker ``worker`` of ``num_workers`` (without spawning processes).

    ``num_workers=0`` iterates in the main process, as a DataLoader without workers does.
    """
    if num_workers == 0:
        return list(ds)
    info = SimpleNamespace(id=worker, num_workers=num_workers)
    monkeypatch.setattr(reader_module, "get_worker_info", lambda: info)
    try:
        return list(ds)
    finally:
        monkeypatch.setattr(reader_module, "get_worker_info", lambda: None)


def round_robin(per_worker: list[list[SequenceBatch]]) -> list[SequenceBatch]:
    """The order in which a DataLoader hands out worker batches (finished workers are skipped)."""
    out = []
    for r in range(max((len(b) for b in per_worker), default=0)):
        out.extend(b[r] for b in per_worker if r < len(b))
    return out


# ------------------------------------------------------------------------------------ collation


def test_collate_rows_matches_python_on_sliced_table():
    items = [[1, 2, 3], [4], [5, 6], [], [7, 8, 9, 10]]
    ts = [[10, 11, 12], [13], [14, 15], [], [16, 17, 18, 19]]
    table = pa.table(
        {
            "user_id": pa.array([1, 2, 3, 4, 5], pa.int64()),
            "item_ids": pa.array(items, pa.list_(pa.int64())),
            "timestamps": pa.array(ts, pa.list_(pa.int64())),
        }
    )
    # Slice and re-chunk: offsets of a sliced list array do not start at 0.
    sliced = pa.concat_tables([table.slice(1, 2), table.slice(3, 2)])
    batch = collate_rows(sliced)
    assert batch.user_ids.tolist() == [2, 3, 4, 5]
    assert batch.lengths.tolist() == [1, 2, 0, 4]
    assert batch.offsets.tolist() == [0, 1, 3, 3, 7]
    assert batch.item_ids.tolist() == [4, 5, 6, 7, 8, 9, 10]
    assert batch.timestamps.tolist() == [13, 14, 15, 16, 17, 18, 19]
    assert batch.item_ids.dtype == torch.int64 and batch.offsets.dtype == torch.int64
    assert (batch.num_rows, batch.num_tokens, batch.max_len) == (4, 7, 4)
    # Record batches and large_list columns work too.
    rb = pa.record_batch(
        [pa.array([9], pa.int64()), pa.array([[3, 4]], pa.large_list(pa.int64()))],
        names=["user_id", "item_ids"],
    )
    one = collate_rows(rb)
    assert one.item_ids.tolist() == [3, 4] and one.timestamps is None


def test_collate_rows_timestamps_null_and_errors():
    base = {
        "user_id": pa.array([1, 2], pa.int64()),
        "item_ids": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
    }
    all_null = pa.table({**base, "timestamps": pa.array([None, None], pa.list_(pa.int64()))})
    assert collate_rows(all_null).timestamps is None
    some_null = pa.table({**base, "timestamps": pa.array([[1, 2], None], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match="null in 1 of 2 rows"):
        collate_rows(some_null)
    bad_len = pa.table({**base, "timestamps": pa.array([[1, 2], [3, 4]], pa.list_(pa.int64()))})
    with pytest.raises(ValueError, match=r"row 1 \(user_id 2\)"):
        collate_rows(bad_len)
    with pytest.raises(ValueError, match="need columns"):
        collate_rows(pa.table({"user_id": pa.array([1], pa.int64())}))


def test_split_last_and_to():
    table = pa.table(
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),
            "item_ids": pa.array([[5, 6, 7], [8], [9, 10]], pa.list_(pa.int64())),
            "timestamps": pa.array([[1, 2, 3], [4], [5, 6]], pa.list_(pa.int64())),
        }
    )
    history, targets = split_last(collate_rows(table).to("cpu"))
    assert targets.tolist() == [7, 8, 10]
    assert rows_of(history) == [(1, (5, 6)), (2, ()), (3, (9,))]
    assert history.timestamps.tolist() == [1, 2, 5]
    assert history.offsets.tolist() == [0, 2, 2, 3]


def test_split_inputs_targets_cuts_rows_and_pairs_each_input_with_its_targets_time():
    table = pa.table(
        {
            "user_id": pa.array([1, 2, 3], pa.int64()),
            "item_ids": pa.array([[1, 2, 3, 4, 5], [6], [7, 8, 9]], pa.list_(pa.int64())),
            "timestamps": pa.array([[10, 20, 30, 40, 50], [60], [70, 80, 90]], pa.list_(pa.int64())),
        }
    )
    batch = collate_rows(table)
    # max_seq_len 3 keeps row 1's last 4 items; row 2 (one item) has nothing to predict and is dropped.
    inputs, offsets, ts, target_ts, targets, kept = split_inputs_targets(batch, 3, last_only=False)
    assert inputs.tolist() == [2, 3, 4, 7, 8] and offsets.tolist() == [0, 3, 5]
    assert targets.tolist() == [3, 4, 5, 8, 9] and kept.tolist() == [True, False, True]
    assert ts.tolist() == [20, 30, 40, 70, 80] and target_ts.tolist() == [30, 40, 50, 80, 90]
    inputs, offsets, ts, target_ts, targets, kept = split_inputs_targets(batch, 3, last_only=True)
    assert targets.tolist() == [5, 9] and target_ts.tolist() == [30, 40, 50, 80, 90]
    no_times = collate_rows(table.drop_columns(["timestamps"]))
    assert split_inputs_targets(no_times, 3, last_only=True)[2:4] == (None, None)


# ------------------------------------------------------------------------------------- manifest


def test_load_manifest_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist.*data_pipeline prepare"):
        load_manifest(tmp_path / "nope")
    (tmp_path / "d").mkdir()
    with pytest.raises(ValueError, match="manifest.json is missing.*data_pipeline prepare"):
        load_manifest(tmp_path / "d")
    (tmp_path / "d" / "manifest.json").write_text(json.dumps({"schema_version": 99, "splits": {}}))
    with pytest.raises(ValueError, match="schema_version 99 is not supported"):
        load_manifest(tmp_path / "d")


def test_dataset_input_errors(tmp_path):
    data_dir, _ = write_test_shards(tmp_path)
    with pytest.raises(ValueError, match="split 'dev' is not in"):
        SequenceDataset(data_dir, "dev", 4)
    with pytest.raises(ValueError, match="max_seq_len \\+ 1 = 13"):
        SequenceDataset(data_dir, "train", 4, max_tokens=8)
    with pytest.raises(ValueError, match="partition must be one of"):
        SequenceDataset(data_dir, "train", 4, partition="files")
    manifest = json.loads((data_dir / "manifest.json").read_text())
    manifest["splits"]["train"]["files"][0]["num_rows"] += 1
    (data_dir / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="part-00000.parquet holds .* rows but the manifest says"):
        SequenceDataset(data_dir, "train", 4)
    (data_dir / "valid" / "part-00001.parquet").unlink()
    with pytest.raises(ValueError, match="lists valid/part-00001.parquet .* missing"):
        SequenceDataset(data_dir, "valid", 4)


def test_worker_count_mismatch_is_an_error(tmp_path, monkeypatch):
    data_dir, _ = write_test_shards(tmp_path)
    ds = SequenceDataset(data_dir, "test", 4, num_workers=0)
    with pytest.raises(ValueError, match="num_workers=0 but is read by 2"):
        iterate_as_worker(monkeypatch, ds, 0, 2)


# --------------------------------------------------------------------------------- partitioning


@pytest.mark.parametrize("partition", ["rows", "row_groups", "strided"])
@pytest.mark.parametrize(("world_size", "num_workers"), [(1, 1), (2, 1), (3, 2), (2, 4), (4, 5)])
def test_every_row_exactly_once(tmp_path, monkeypatch, partition, world_size, num_workers):
    # 37 users, 3 files, row groups of 5 rows -> 9 units; (4, 5) has 20 workers, more than units.
    data_dir, expected = write_test_shards(tmp_path, num_users=37, row_group_size=5)
    want = {u: tuple(items) for u, (items, _) in expected["test"].items()}
    for epoch in (0, 1):
        seen: list[tuple[int, tuple[int, ...]]] = []
        rows_per_worker = []
        for rank in range(world_size):
            ds = SequenceDataset(
                data_dir,
                "test",
                3,
                rank=rank,
                world_size=world_size,
                num_workers=num_workers,
                partition=partition,
            )
            ds.set_epoch(epoch)
            per_worker = [iterate_as_worker(monkeypatch, ds, w, num_workers) for w in range(num_workers)]
            for batches in per_worker:
                rows = [r for b in batches for r in rows_of(b)]
                rows_per_worker.append(len(rows))
                seen.extend(rows)
            assert ds.num_batches_for_rank() == sum(len(b) for b in per_worker)
        assert sorted(seen) == sorted(want.items())  # all rows, none twice, contents intact
        if partition == "rows":
            assert max(rows_per_worker) - min(rows_per_worker) <= 1


def test_several_splits_read_as_one_stream(tmp_path, monkeypatch):
    """A list of splits (the trainer's train + older): every row of each, once, over 2 ranks x 2 workers."""
    data_dir, expected = write_test_shards(tmp_path, num_users=23, row_group_size=3)
    want = sorted(
        (u, tuple(items)) for split in ("train", "test") for u, (items, _) in expected[split].items()
    )
    seen = []
    for rank in range(2):
        ds = SequenceDataset(data_dir, ["train", "test"], 4, rank=rank, world_size=2, num_workers=2)
        assert ds.split == "train+test" and ds.num_rows == 46
        seen += [r for w in range(2) for b in iterate_as_worker(monkeypatch, ds, w, 2) for r in rows_of(b)]
    assert sorted(seen) == want
    with pytest.raises(ValueError, match="split 'older' is not in"):
        SequenceDataset(data_dir, ["train", "older"], 4)


def test_shuffle_is_deterministic_per_epoch(tmp_path):
    data_dir, expected = write_test_shards(tmp_path, num_users=60, row_group_size=4)

    def users(epoch: int, seed: int = 0, shuffle: bool = True) -> list[int]:
        ds = SequenceDataset(data_dir, "train", 5, seed=seed, shuffle=shuffle)
        ds.set_epoch(epoch)
        return [u for b in ds for u in b.user_ids.tolist()]

    assert users(0) == users(0)
    assert users(0) != users(1) and sorted(users(0)) == sorted(users(1))
    assert users(0, seed=1) != users(0)
    assert users(0, shuffle=False) == sorted(expected["train"])  # file order = user order


def test_timestamps_and_no_timestamps(tmp_path):
    data_dir, expected = write_test_shards(tmp_path, num_users=20)
    for batch in SequenceDataset(data_dir, "valid", 6, shuffle=False):
        off = batch.offsets.tolist()
        for i, u in enumerate(batch.user_ids.tolist()):
            assert batch.timestamps[off[i] : off[i + 1]].tolist() == expected["valid"][u][1]
    no_ts_dir, _ = write_test_shards(tmp_path / "nots", num_users=20, with_timestamps=False)
    assert all(b.timestamps is None for b in SequenceDataset(no_ts_dir, "valid", 6))


def test_max_tokens_and_drop_last(tmp_path):
    data_dir, expected = write_test_shards(tmp_path, num_users=80, row_group_size=6, max_seq_len=12)
    ds = SequenceDataset(data_dir, "test", 8, max_tokens=30)
    batches = list(ds)
    assert all(b.num_tokens <= 30 and b.num_rows <= 8 for b in batches)
    assert sorted(u for b in batches for u in b.user_ids.tolist()) == sorted(expected["test"])
    assert ds.num_batches_for_rank() == len(batches)
    # Greedy packing: every batch but the last was closed because the next row would not fit.
    for b, nxt in zip(batches[:-1], batches[1:]):
        assert b.num_rows == 8 or b.num_tokens + int(nxt.lengths[0]) > 30
    dropped = SequenceDataset(data_dir, "test", 7, drop_last=True)
    kept = list(dropped)
    assert all(b.num_rows == 7 for b in kept) and len(kept) == 80 // 7 == dropped.num_batches_for_rank()


@pytest.mark.parametrize("shuffle", [False, True])
def test_strided_global_batches_do_not_depend_on_world_size(tmp_path, shuffle):
    # Global batch k (the union of every rank's batch k) must hold the same rows for 1, 2 and 4
    # ranks: what lets a sharded run be compared step by step with a single-process run.
    data_dir, _ = write_test_shards(tmp_path, num_users=53, row_group_size=5)
    global_batch = 8

    def batches(world_size: int) -> list[set[int]]:
        per_rank = []
        for rank in range(world_size):
            ds = SequenceDataset(data_dir, "train", global_batch // world_size, rank=rank, world_size=world_size,
                                 shuffle=shuffle, seed=5, partition="strided")  # fmt: skip
            ds.set_epoch(1)
            per_rank.append([set(b.user_ids.tolist()) for b in ds])
        steps = min(len(p) for p in per_rank)
        return [set().union(*(p[k] for p in per_rank)) for k in range(steps)]

    single = batches(1)
    assert len(single) == 7 and sum(len(b) for b in single) == 53
    for world_size in (2, 4):
        multi = batches(world_size)
        assert multi == single[: len(multi)] and len(multi) >= 6


# --------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize(
    ("max_tokens", "partition"),
    [(None, "rows"), (25, "rows"), (None, "row_groups"), (25, "row_groups"), (None, "strided")],
)
def test_resume_in_process_and_simulated_workers(tmp_path, monkeypatch, max_tokens, partition):
    # 70 rows in groups of 6: workers get different batch counts in most of these settings.
    data_dir, _ = write_test_shards(tmp_path, num_users=70, row_group_size=6)
    kwargs = dict(rank=1, world_size=2, seed=3, max_tokens=max_tokens, partition=partition)
    for num_workers in (0, 3):
        num_local = max(1, num_workers)
        ds = SequenceDataset(data_dir, "train", 3, num_workers=num_workers, **kwargs)
        ds.set_epoch(2)
        per_worker = [iterate_as_worker(monkeypatch, ds, w, num_workers) for w in range(num_local)]
        full = round_robin(per_worker) if num_workers else per_worker[0]
        assert len(full) == ds.num_batches_for_rank() > 4
        for k in range(len(full) + 1):
            state = ds.state_dict(batches_consumed=k)
            fresh = SequenceDataset(data_dir, "train", 3, num_workers=num_workers, **kwargs)
            fresh.load_state_dict(state)
            rest = [iterate_as_worker(monkeypatch, fresh, w, num_workers) for w in range(num_local)]
            resumed = round_robin(rest) if num_workers else rest[0]
            assert key_of(resumed) == key_of(full[k:]), f"num_workers={num_workers} k={k}"


def test_state_dict_counts_in_process_batches(tmp_path):
    data_dir, _ = write_test_shards(tmp_path, num_users=30)
    ds = SequenceDataset(data_dir, "train", 4, seed=5)
    ds.set_epoch(1)
    full = list(ds)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = ds.state_dict()
    assert (state["epoch"], state["batches_consumed"]) == (1, 3)
    fresh = SequenceDataset(data_dir, "train", 4, seed=5)
    fresh.load_state_dict(state)
    assert key_of(list(fresh)) == key_of(full[3:])
    fresh.set_epoch(2)  # a resume point applies to its own epoch only
    assert sum(b.num_rows for b in fresh) == 30
    other = SequenceDataset(data_dir, "train", 5, seed=5)
    with pytest.raises(ValueError, match="batch_size=4 but this dataset has batch_size=5"):
        other.load_state_dict(state)


@pytest.mark.parametrize("max_tokens", [None, 25])
def test_resume_with_real_dataloader_workers(tmp_path, max_tokens):
    # row_groups partition gives the two workers different batch counts, so the round-robin
    # derivation is exercised past the point where one worker is exhausted.
    data_dir, _ = write_test_shards(tmp_path, num_users=45, row_group_size=5)
    kwargs = dict(num_workers=2, seed=1, partition="row_groups", max_tokens=max_tokens)
    ds = SequenceDataset(data_dir, "test", 3, **kwargs)
    full = list(ds.loader())
    assert len(full) == ds.num_batches_for_rank()
    assert ds._worker_num_batches(0, 0, 2) > ds._worker_num_batches(0, 1, 2)  # worker 1 finishes first
    for k in (0, 5, len(full) - 2, len(full)):
        fresh = SequenceDataset(data_dir, "test", 3, **kwargs)
        fresh.load_state_dict(ds.state_dict(batches_consumed=k))
        assert key_of(list(fresh.loader())) == key_of(full[k:]), f"k={k}"


# ------------------------------------------------------------------------- real prepare output


def test_reads_real_prepare_output(synthetic_data, monkeypatch):
    """The prepare job's directory (conftest fixture): every row once over 2 ranks x 2 workers, intact."""
    manifest = load_manifest(synthetic_data)
    for split in ("train", "test"):
        files = [synthetic_data / f["path"] for f in manifest["splits"][split]["files"]]
        table = pa.concat_tables([pq.read_table(p) for p in files])
        want = sorted(zip(table["user_id"].to_pylist(), map(tuple, table["item_ids"].to_pylist())))
        seen = []
        for rank in range(2):
            ds = SequenceDataset(synthetic_data, split, 16, rank=rank, world_size=2, num_workers=2)
            for w in range(2):
                seen += [r for b in iterate_as_worker(monkeypatch, ds, w, 2) for r in rows_of(b)]
        assert sorted(seen) == want
        assert len(want) == manifest["splits"][split]["num_rows"] > 0
