"""End-to-end tests of ``python -m data_pipeline prepare`` on one shared local Ray (num_cpus=2).

Outputs are compared with a brute-force pure-Python reference of the documented rules
(docs/data_format.md, docs/data_pipeline.md), and with known counts of the real data sets.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError, load_config
from data_pipeline.config import PrepareConfig
from data_pipeline.prepare import main, prepare
from data_pipeline.writer import MARKER, sha256_file

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
needs_shared = pytest.mark.skipif(
    not SHARED.is_dir(), reason=f"{SHARED} is absent (real data sets live there in CI)"
)


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    """One local Ray for the module: prepare() uses a running Ray instead of starting its own."""
    ray = pytest.importorskip("ray")
    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield
    if started:
        ray.shutdown()


def run(out: Path, overrides: list[str], config: str | None = None) -> dict:
    cfg = load_config(PrepareConfig, config, [f"output.dir={out}", *overrides])
    return prepare(cfg)


def read_split(out: Path, manifest: dict, split: str) -> list[dict]:
    tables = [pq.read_table(out / f["path"]) for f in manifest["splits"][split]["files"]]
    return pa.concat_tables(tables).to_pylist() if tables else []


def vocab(out: Path, name: str) -> dict[str, int]:
    table = pq.read_table(out / "vocab" / f"{name}.parquet")
    return dict(zip(table["raw_id"].to_pylist(), table["dense_id"].to_pylist()))


# ---------------------------------------------------------------------------------------------------
# Brute-force reference


def reference(
    interactions: list[dict],
    *,
    min_rating: float | None = None,
    dedup: str = "none",
    user_core: int = 0,
    item_core: int = 0,
    min_seq_len: int = 3,
    max_seq_len: int = 200,
    temporal: tuple[int, int | None] | None = None,
) -> dict:
    """The documented rules, one interaction at a time. ``interactions`` are dicts with user, item,
    ts, rating and order (the file-then-row position)."""
    rows = [r for r in interactions if min_rating is None or r["rating"] >= min_rating]
    rows.sort(key=lambda r: (r["ts"], r["order"]))
    if dedup != "none":
        seen: dict[tuple, dict] = {}
        for r in rows:
            key = (r["user"], r["item"])
            if dedup == "keep_last" or key not in seen:
                seen[key] = r
        kept = {id(r) for r in seen.values()}
        rows = [r for r in rows if id(r) in kept]
    while True:  # the (item_core, max(user_core, min_seq_len)) core, by plain iteration
        uc, ic = Counter(r["user"] for r in rows), Counter(r["item"] for r in rows)
        kept_rows = [
            r for r in rows if ic[r["item"]] >= item_core and uc[r["user"]] >= max(user_core, min_seq_len)
        ]
        if len(kept_rows) == len(rows):
            break
        rows = kept_rows
    item_counts, user_counts = Counter(r["item"] for r in rows), Counter(r["user"] for r in rows)
    items = {raw: i + 1 for i, raw in enumerate(sorted(item_counts, key=lambda k: (-item_counts[k], k)))}
    users = {raw: i + 1 for i, raw in enumerate(sorted(user_counts, key=lambda k: (-user_counts[k], k)))}
    seqs: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        seqs[users[r["user"]]].append(r)
    keep = max_seq_len + 1
    splits: dict[str, list[tuple]] = {"train": [], "valid": [], "test": []}
    for uid in sorted(seqs):
        s = seqs[uid]
        if temporal is None:
            cuts = {"train": len(s) - 2, "valid": len(s) - 1, "test": len(s)}
        else:
            t_cut, v_cut = temporal
            before_t = sum(r["ts"] < t_cut for r in s)
            cuts = {}
            if 1 <= before_t < len(s):
                cuts["test"] = before_t + 1
            if v_cut is None:
                if before_t >= 2:
                    cuts["train"], cuts["valid"] = before_t - 1, before_t
            else:
                before_v = sum(r["ts"] < v_cut for r in s)
                if before_v >= 1:
                    cuts["train"] = before_v
                    if before_v < before_t:
                        cuts["valid"] = before_v + 1
        for name, end in cuts.items():
            part = s[:end][-keep:]
            splits[name].append((uid, [items[r["item"]] for r in part], [r["ts"] for r in part]))
    return {"items": items, "users": users, "splits": splits, "num_interactions": len(rows)}


def output_rows(out: Path, manifest: dict) -> dict[str, list[tuple]]:
    return {
        split: [(r["user_id"], r["item_ids"], r["timestamps"]) for r in read_split(out, manifest, split)]
        for split in ("train", "valid", "test")
    }


def random_log(
    tmp_path: Path, seed: int = 0, num_users: int = 120, num_files: int = 2
) -> tuple[list[Path], list[dict]]:
    """CSV files with skewed popularity, timestamp ties, shuffled rows, repeats and unicode ids."""
    rng = random.Random(seed)
    interactions, paths = [], []
    order = 0
    for f in range(num_files):
        lines = ["user,item,timestamp,rating"]
        for k in range(num_users * 12 // num_files):
            u = (
                f"u{int(num_users * rng.random() ** 2)}"
                if rng.random() < 0.95
                else rng.choice(["ü", "用户", "u 1"])
            )
            if k % 500 == 7:
                u = f"short{f}"  # two or three interactions: below min_seq_len=3 or just at it
            item = f"i{int(300 * rng.random() ** 3)}"
            ts = 1_600_000_000 + rng.randrange(0, 50) * 1000  # many ties
            rating = rng.randint(1, 5)
            lines.append(f"{u},{item},{ts},{rating}")
            interactions.append({"user": u, "item": item, "ts": ts, "rating": rating, "order": order})
            order += 1
        path = tmp_path / f"log-{f}.csv"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths, interactions


CSV_COLUMNS = ["input.format=csv", "input.columns.rating=rating"]


def paths_override(paths: list[Path]) -> str:
    return "input.paths=[" + ", ".join(str(p) for p in paths) + "]"


# ---------------------------------------------------------------------------------------------------
# Real data sets


def _brute_force_sequences(users: np.ndarray, items: np.ndarray, ts: np.ndarray) -> dict[str, list[str]]:
    """Per raw user, raw items in time order, ties by file row (numpy stable sort)."""
    order = np.lexsort((np.arange(len(users)), ts, users))
    seqs: dict[str, list[str]] = defaultdict(list)
    for k in order:
        seqs[users[k]].append(items[k])
    return seqs


def _check_sequences(out: Path, manifest: dict, seqs: dict[str, list[str]], max_seq_len: int) -> None:
    items, users = vocab(out, "items"), vocab(out, "users")
    by_user = {
        split: {r["user_id"]: r["item_ids"] for r in read_split(out, manifest, split)}
        for split in ("train", "valid", "test")
    }
    for raw_user, raw_items in seqs.items():
        dense = [items[i] for i in raw_items]
        uid = users[raw_user]
        assert by_user["test"][uid] == dense[-(max_seq_len + 1) :], raw_user
        assert by_user["valid"][uid] == dense[:-1][-(max_seq_len + 1) :], raw_user
        assert by_user["train"][uid] == dense[:-2][-(max_seq_len + 1) :], raw_user


@needs_shared
@pytest.mark.shared_data
def test_ml100k(tmp_path):
    out = tmp_path / "ml100k"
    manifest = run(out, [], config=str(ROOT / "configs/data/ml100k.yaml"))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (
        943,
        1682,
        100_000,
    )
    data = np.loadtxt(SHARED / "ml-100k/u.data", dtype=np.int64)
    seqs = _brute_force_sequences(data[:, 0].astype(str), data[:, 1].astype(str), data[:, 3])
    # Each user's test target is their chronologically last item (ties: the later row of u.data).
    items, users = vocab(out, "items"), vocab(out, "users")
    test = {r["user_id"]: r for r in read_split(out, manifest, "test")}
    for raw_user, raw_items in seqs.items():
        assert test[users[raw_user]]["item_ids"][-1] == items[raw_items[-1]]
    _check_sequences(out, manifest, seqs, max_seq_len=200)
    # Vocabulary: dense ids by descending count, ties by raw id.
    counts = Counter(data[:, 1].astype(str).tolist())
    assert list(items) == sorted(counts, key=lambda k: (-counts[k], k))
    meta = pq.read_table(out / "items/metadata.parquet")
    assert meta.num_rows == 1682 and meta["dense_id"].to_pylist() == list(range(1, 1683))
    assert manifest["item_metadata"]["num_items_with_metadata"] == 1682


@needs_shared
@pytest.mark.shared_data
def test_ml1m_ratings_default(tmp_path):
    """The default ML-1M input is ratings.dat: timestamps kept, same-second items in file row order."""
    out = tmp_path / "ml1m"
    manifest = run(out, [], config=str(ROOT / "configs/data/ml1m.yaml"))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (
        6040,
        3706,
        1_000_209,
    )
    assert manifest["has_timestamps"] is True
    rows = [line.split("::") for line in (SHARED / "ml-1m/ratings.dat").read_text().splitlines()]
    users = np.array([r[0] for r in rows])
    items = np.array([r[1] for r in rows])
    ts = np.array([int(r[3]) for r in rows], dtype=np.int64)
    seqs = _brute_force_sequences(users, items, ts)
    _check_sequences(out, manifest, seqs, max_seq_len=200)
    # Timestamps travel with the items: the test row of every user carries the brute-force times.
    order = np.lexsort((np.arange(len(users)), ts, users))
    times: dict[str, list[int]] = defaultdict(list)
    for k in order:
        times[users[k]].append(int(ts[k]))
    user_vocab = {v: k for k, v in vocab(out, "users").items()}
    for r in read_split(out, manifest, "test"):
        assert r["timestamps"] == times[user_vocab[r["user_id"]]][-201:], r["user_id"]


@needs_shared
@pytest.mark.shared_data
def test_ml1m_sequences(tmp_path):
    out = tmp_path / "ml1m"
    seq_file = SHARED / "ml-1m/sequences.txt"
    manifest = run(
        out,
        ["input.format=sequences", f"input.paths=[{seq_file}]"],
        config=str(ROOT / "configs/data/ml1m.yaml"),
    )
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (
        6040,
        3706,
        1_000_209,
    )
    assert manifest["has_timestamps"] is False
    seqs = {}
    for line in (SHARED / "ml-1m/sequences.txt").read_text().splitlines():
        user, *line_items = line.split()
        seqs[user] = line_items
    _check_sequences(out, manifest, seqs, max_seq_len=200)
    assert read_split(out, manifest, "test")[0]["timestamps"] is None
    # The older windows hold every train target that the 201-item train rows cut.
    older, train = manifest["splits"]["older"], manifest["splits"]["train"]
    cut = [len(s) - 2 - 201 for s in seqs.values() if len(s) - 2 > 201]  # train targets cut, per long user
    assert train["num_truncated"] == sum(cut) == 334_470
    assert older["num_interactions"] - older["num_rows"] == train["num_truncated"]
    assert older["num_rows"] == sum(-(-n // 200) for n in cut)
    assert len(cut) == len({r["user_id"] for r in read_split(out, manifest, "older")})


@needs_shared
@pytest.mark.shared_data
def test_amazon_beauty_tsv(tmp_path):
    out = tmp_path / "beauty"
    manifest = run(out, [], config=str(ROOT / "configs/data/amazon_beauty.yaml"))
    assert (manifest["num_users"], manifest["num_items"], manifest["num_interactions"]) == (
        22_363,
        12_101,
        198_502,
    )
    table = pa_csv.read_csv(
        SHARED / "amazon-beauty/interactions.tsv",
        parse_options=pa_csv.ParseOptions(delimiter="\t"),
        convert_options=pa_csv.ConvertOptions(column_types={"user_id": pa.string(), "item_id": pa.string()}),
    )
    seqs = _brute_force_sequences(
        np.asarray(table["user_id"].to_pylist()),
        np.asarray(table["item_id"].to_pylist()),
        table["timestamp"].to_numpy(),
    )
    _check_sequences(out, manifest, seqs, max_seq_len=50)


# ---------------------------------------------------------------------------------------------------
# Synthetic logs against the reference


def test_matches_reference_and_is_deterministic(tmp_path):
    paths, interactions = random_log(tmp_path)
    common = [paths_override(paths), *CSV_COLUMNS, "output.rows_per_file=40", "output.row_group_size=16"]
    m1 = run(tmp_path / "a", common)
    m2 = run(tmp_path / "b", common)
    # Different bucketing and read chunks must not change a byte of the output.
    m3 = run(tmp_path / "c", [*common, "ray.num_buckets=3", "ray.read_chunk_bytes=1024"])
    ref = reference(interactions)
    assert output_rows(tmp_path / "a", m1) == ref["splits"]
    assert vocab(tmp_path / "a", "items") == ref["items"] and vocab(tmp_path / "a", "users") == ref["users"]
    assert m1["num_interactions"] == ref["num_interactions"]
    assert m1["filtered"]["short_users"] > 0  # the log has users with < 3 interactions
    for split in ("train", "valid", "test"):
        files = [(f["path"], f["sha256"]) for f in m1["splits"][split]["files"]]
        assert len(files) > 1  # several shards
        assert files == [(f["path"], f["sha256"]) for f in m2["splits"][split]["files"]]
        assert files == [(f["path"], f["sha256"]) for f in m3["splits"][split]["files"]]
        for rel, digest in files:
            assert sha256_file(tmp_path / "b" / rel) == digest
            meta = pq.ParquetFile(tmp_path / "a" / rel).metadata
            assert meta.num_row_groups == -(-meta.num_rows // 16) and meta.row_group(0).num_rows == min(
                16, meta.num_rows
            )
    assert m1["input_fingerprint"] == m3["input_fingerprint"]
    # Leave-one-out never leaks a target into the model input.
    rows = {s: {r[0]: r[1] for r in output_rows(tmp_path / "a", m1)[s]} for s in ("train", "valid", "test")}
    for uid, test_items in rows["test"].items():
        if len(test_items) <= 201:
            assert test_items[:-1] == rows["valid"][uid] and rows["valid"][uid][:-1] == rows["train"][uid]


def test_truncation_keeps_most_recent(tmp_path):
    paths, interactions = random_log(tmp_path, seed=1)
    manifest = run(tmp_path / "out", [paths_override(paths), *CSV_COLUMNS, "max_seq_len=4"])
    ref = reference(interactions, max_seq_len=4)
    got = output_rows(tmp_path / "out", manifest)
    assert got == ref["splits"]
    assert max(len(r[1]) for r in got["test"]) == 5
    full = reference(interactions, max_seq_len=10_000)["splits"]["test"]
    assert manifest["splits"]["test"]["num_truncated"] == sum(
        len(r[1]) - len(t[1]) for r, t in zip(full, got["test"])
    )
    # max_seq_len cuts rows, not the data: the vocabulary counts every kept interaction.
    assert manifest["num_interactions"] == ref["num_interactions"]


@pytest.mark.parametrize("method", ["leave_one_out", "temporal"])
def test_older_windows_hold_exactly_the_cut_history(tmp_path, method):
    """split.older_windows: the windows plus the train row rebuild each user's full train sequence,
    every window is at most max_seq_len + 1 items, and no valid or test target gets in."""
    paths, interactions = random_log(tmp_path, seed=2)
    temporal = (1_600_040_000, None) if method == "temporal" else None
    split = ["split.method=temporal", f"split.temporal_cutoff={temporal[0]}"] if temporal else []
    overrides = [paths_override(paths), *CSV_COLUMNS, "max_seq_len=4", *split]
    manifest = run(tmp_path / "out", [*overrides, "split.older_windows=true"])
    full_train = reference(interactions, max_seq_len=10_000, temporal=temporal)["splits"]["train"]
    full = {uid: items for uid, items, _ in full_train}
    got = output_rows(tmp_path / "out", manifest)
    # The split rows are the same as without the option.
    assert got == reference(interactions, max_seq_len=4, temporal=temporal)["splits"]
    windows: dict[int, list[list[int]]] = defaultdict(list)
    older_rows = read_split(tmp_path / "out", manifest, "older")
    for r in older_rows:  # ordered by user, then oldest first
        windows[r["user_id"]].append(r["item_ids"])
    assert windows, "the random log has users longer than max_seq_len"
    for uid, row, _ in got["train"]:
        ws = windows.pop(uid, [])
        assert len(ws) == (len(full[uid]) > 5) * -(-(len(full[uid]) - 5) // 4), uid
        assert all(2 <= len(w) <= 5 for w in ws)
        for older, newer in zip(ws, ws[1:] + [row]):
            assert older[-1] == newer[0], uid  # one item of context carried over, no target twice
        rebuilt = (ws[0] + [i for w in ws[1:] for i in w[1:]] + row[1:]) if ws else row
        assert rebuilt == full[uid], uid
    assert not windows, "windows only for users with a train row"
    older = manifest["splits"]["older"]
    assert older["num_rows"] == len(older_rows)
    assert older["num_interactions"] - older["num_rows"] == manifest["splits"]["train"]["num_truncated"]
    assert "older" not in run(tmp_path / "default", overrides)["splits"]


def test_k_core_and_filters(tmp_path):
    paths, interactions = random_log(tmp_path, seed=2, num_users=200)
    overrides = [
        paths_override(paths),
        *CSV_COLUMNS,
        "filters.user_core=5",
        "filters.item_core=6",
        "filters.min_rating=2",
        "filters.dedup=keep_last",
        "max_seq_len=10000",
    ]
    manifest = run(tmp_path / "out", overrides)
    ref = reference(
        interactions, min_rating=2, dedup="keep_last", user_core=5, item_core=6, max_seq_len=10000
    )
    got = output_rows(tmp_path / "out", manifest)
    assert got == ref["splits"]
    assert manifest["k_core_rounds"] >= 1
    # The result really is a k-core: count from the output itself (test rows are whole sequences).
    user_deg = {uid: len(items) for uid, items, _ in got["test"]}
    item_deg = Counter(i for _, items, _ in got["test"] for i in items)
    assert min(user_deg.values()) >= 5 and min(item_deg.values()) >= 6
    f = manifest["filtered"]
    assert f["min_rating"] == sum(r["rating"] < 2 for r in interactions)
    assert f["dedup"] > 0 and f["k_core_interactions"] > 0
    removed = f["min_rating"] + f["dedup"] + f["k_core_interactions"] + f["short_user_interactions"]
    assert manifest["num_interactions"] == len(interactions) - removed == ref["num_interactions"]


def test_temporal_split(tmp_path):
    paths, interactions = random_log(tmp_path, seed=3)
    t_cut, v_cut = 1_600_035_000, 1_600_020_000
    base = [paths_override(paths), *CSV_COLUMNS, "split.method=temporal", f"split.temporal_cutoff={t_cut}"]
    m1 = run(tmp_path / "a", base)
    m2 = run(tmp_path / "b", [*base, f"split.valid_cutoff={v_cut}", "filters.min_seq_len=2"])
    assert (
        output_rows(tmp_path / "b", m2)
        == reference(interactions, min_seq_len=2, temporal=(t_cut, v_cut))["splits"]
    )
    assert (
        output_rows(tmp_path / "a", m1)
        == reference(interactions, min_seq_len=3, temporal=(t_cut, None))["splits"]
    )
    test_rows = read_split(tmp_path / "b", m2, "test")
    assert all(
        r["timestamps"][-1] >= t_cut and all(t < t_cut for t in r["timestamps"][:-1]) for r in test_rows
    )
    # A cutoff after every interaction leaves the test split empty: one empty file keeps its schema.
    m3 = run(tmp_path / "c", [*base[:-1], "split.temporal_cutoff=2000000000"])
    (test_file,) = m3["splits"]["test"]["files"]
    assert m3["splits"]["test"]["num_rows"] == 0 and test_file["num_rows"] == 0
    schema = pq.read_schema(tmp_path / "c" / test_file["path"])
    assert schema.names == ["user_id", "item_ids", "timestamps", "ratings", "split"]


def test_same_output_from_parquet_and_jsonl(tmp_path):
    paths, interactions = random_log(tmp_path, seed=4, num_files=1)
    csv_out = run(tmp_path / "csv", [paths_override(paths), *CSV_COLUMNS])
    table = pa.table(
        {
            "user": [r["user"] for r in interactions],
            "item": [r["item"] for r in interactions],
            "timestamp": pa.array([r["ts"] for r in interactions], pa.int64()),
            "rating": pa.array([r["rating"] for r in interactions], pa.float64()),
        }
    )
    pq.write_table(table, tmp_path / "log.parquet", row_group_size=100)
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in table.to_pylist()))
    for fmt in ("parquet", "jsonl"):
        m = run(
            tmp_path / fmt,
            [
                f"input.paths=[{tmp_path / f'log.{fmt}'}]",
                f"input.format={fmt}",
                "input.columns.rating=rating",
            ],
        )
        for split in ("train", "valid", "test"):
            assert [f["sha256"] for f in m["splits"][split]["files"]] == [
                f["sha256"] for f in csv_out["splits"][split]["files"]
            ], (fmt, split)


# ---------------------------------------------------------------------------------------------------
# Malformed inputs


MALFORMED = (
    "user,item,timestamp,rating\n"  # 1
    "alice,i1,300,5\n"  # 2  out of order: comes after the next two
    "alice,i2,100,4\n"  # 3
    "alice,i3,200,3\n"  # 4
    "alice,i3,200,3\n"  # 5  duplicate row
    "bob,i1\n"  # 6  truncated line
    "bob,i1,100,4,x\n"  # 7  wrong column count
    "bob,i2,soon,4\n"  # 8  unparseable timestamp
    "bob,i3,101,NaN\n"  # 9  NaN rating
    "björk,i1,50,5\n"  # 10 unicode id
    "björk,i2,50,5\n"  # 11 same timestamp: file order
    "björk,i4,40,1\n"  # 12
    ",i4,40,1\n"  # 13 missing user
)


def test_malformed_rows_are_rejected_with_reasons(tmp_path):
    (tmp_path / "bad.csv").write_text(MALFORMED)
    overrides = [
        f"input.paths=[{tmp_path / 'bad.csv'}]",
        *CSV_COLUMNS,
        "filters.dedup=keep_first",
        "max_reject_fraction=0.5",
    ]
    manifest = run(tmp_path / "out", overrides)
    out = tmp_path / "out"
    rejects = pa.concat_tables([pq.read_table(out / f["path"]) for f in manifest["reject_files"]]).to_pylist()
    assert [(r["row_number"], r["reason"]) for r in rejects] == [
        (6, "wrong_column_count"),
        (7, "wrong_column_count"),
        (8, "bad_timestamp"),
        (9, "nan_rating"),
        (13, "missing_user"),
    ]
    assert all(r["source_file"] == str(tmp_path / "bad.csv") for r in rejects)
    assert rejects[0]["raw"] == "bob,i1" and rejects[2]["raw"] == "bob,i2,soon,4"
    assert manifest["num_rejected"] == 5 and manifest["num_input_records"] == 12
    assert manifest["rejected_by_reason"] == {
        "bad_timestamp": 1,
        "missing_user": 1,
        "nan_rating": 1,
        "wrong_column_count": 2,
    }
    assert manifest["filtered"]["dedup"] == 1
    # bob has no valid interactions left; alice and björk have 3 each.
    assert manifest["num_users"] == 2 and manifest["num_interactions"] == 6
    items, users = vocab(out, "items"), vocab(out, "users")
    test = {r["user_id"]: r for r in read_split(out, manifest, "test")}
    alice, bjork = test[users["alice"]], test[users["björk"]]
    assert alice["item_ids"] == [items["i2"], items["i3"], items["i1"]] and alice["timestamps"] == [
        100,
        200,
        300,
    ]
    assert bjork["item_ids"] == [items["i4"], items["i1"], items["i2"]] and bjork["ratings"] == [
        1.0,
        5.0,
        5.0,
    ]


def test_too_many_rejects_fail_with_a_clear_message(tmp_path):
    (tmp_path / "bad.csv").write_text(MALFORMED)
    with pytest.raises(ValueError) as info:
        run(tmp_path / "out", [f"input.paths=[{tmp_path / 'bad.csv'}]", *CSV_COLUMNS])
    message = str(info.value)
    for expected in (
        "rejected 5 of 12",
        "41.67%",
        "bad.csv",
        "wrong_column_count: 2",
        "row 6: 'bob,i1'",
        "max_reject_fraction",
    ):
        assert expected in message, (expected, message)
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert list((tmp_path / "out" / "rejects").glob("*.parquet"))  # kept for inspection


def test_empty_and_header_only_files_and_bad_header(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv' is empty"):
        run(tmp_path / "out", ["input.paths=[" + str(tmp_path / "empty.csv") + "]"])
    assert not (tmp_path / "out").exists()  # nothing is touched before the inputs check out
    (tmp_path / "header.csv").write_text("user,item,timestamp\n")
    with pytest.raises(ValueError, match="header.csv' has no data rows"):
        run(tmp_path / "out", ["input.paths=[" + str(tmp_path / "header.csv") + "]"])
    (tmp_path / "bad.csv").write_text("usr,item,timestamp\nu,i,1\n")
    with pytest.raises(ValueError, match=r"no column 'user'.*columns found: \['usr', 'item', 'timestamp'\]"):
        run(tmp_path / "out2", ["input.paths=[" + str(tmp_path / "bad.csv") + "]"])


def test_output_dir_lifecycle(tmp_path):
    paths, _ = random_log(tmp_path, seed=5, num_files=1)
    overrides = [paths_override(paths), *CSV_COLUMNS]
    out = tmp_path / "out"
    # A killed run leaves the marker and partial files but no manifest: it is cleaned up.
    (out / "train").mkdir(parents=True)
    (out / MARKER).write_text("")
    (out / "train" / "part-00007.parquet").write_text("partial")
    (out / "_work").mkdir()
    manifest = run(out, overrides)
    assert not (out / "train" / "part-00007.parquet").exists() and not (out / "_work").exists()
    assert json.loads((out / "manifest.json").read_text()) == json.loads(json.dumps(manifest))
    assert (out / "config.yaml").exists()
    # A complete output is replaced only on request.
    with pytest.raises(ValueError, match="output.overwrite=true"):
        run(out, overrides)
    assert run(out, [*overrides, "output.overwrite=true"])["num_users"] == manifest["num_users"]
    # A directory we did not write is never deleted.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing to delete"):
        run(foreign, overrides)
    assert (foreign / "thesis.tex").read_text() == "precious"


def test_manifest_is_written_last(tmp_path, monkeypatch):
    paths, _ = random_log(tmp_path, seed=7, num_files=1)
    overrides = [paths_override(paths), *CSV_COLUMNS]
    out = tmp_path / "out"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed just before the manifest")

    monkeypatch.setattr("data_pipeline.prepare.write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        run(out, overrides)
    # Every data file is there, but without the manifest the directory counts as incomplete ...
    assert list((out / "test").glob("*.parquet")) and not (out / "manifest.json").exists()
    monkeypatch.undo()
    # ... so the next run (no overwrite needed) cleans it and completes.
    (out / "test" / "stale.parquet").write_text("from the killed run")
    manifest = run(out, overrides)
    assert not (out / "test" / "stale.parquet").exists() and (out / "manifest.json").exists()
    assert manifest["num_users"] > 0


@pytest.mark.slow
def test_sigkilled_run_leaves_no_manifest_and_the_next_run_cleans_up(tmp_path):
    """A real ``prepare`` process killed with SIGKILL mid-run (no cleanup code can run, as under the
    OOM killer or ``scancel``): no manifest, its ``_work/`` stays behind, and the next run into the
    same directory removes it and completes."""
    rng = np.random.default_rng(0)
    num_users, per_user = 8_000, 15  # big enough that the job is still running when _work/ appears
    users = np.repeat(np.arange(num_users), per_user)
    items = rng.integers(0, 2_000, len(users))
    ts = 1_600_000_000 + rng.integers(0, 10**6, len(users))
    log = tmp_path / "log.csv"
    pa_csv.write_csv(pa.table({"user": users.astype(str), "item": items.astype(str), "timestamp": ts}), log)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_pipeline", "prepare", "input.format=csv", f"input.paths=[{log}]",
           f"output.dir={out}", "ray.num_cpus=1", "ray.read_chunk_bytes=65536"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    log_file = (tmp_path / "killed.log").open("w")  # a file, not a pipe nobody reads while we wait
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not any((out / "_work").rglob("*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, f"prepare ended first:\n{(tmp_path / 'killed.log').read_text()[-3000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        _kill_session(proc)
        log_file.close()
    assert not (out / "manifest.json").exists()
    assert (out / MARKER).exists()
    assert any((out / "_work").rglob("*")), "SIGKILL runs no cleanup: the intermediate files are still there"
    # The next run (no output.overwrite needed) takes the marked, manifest-less directory as a killed run.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "removing an incomplete output" in again.stderr
    assert not (out / "_work").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["num_users"], manifest["num_interactions"]) == (num_users, len(users))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL what ``proc`` started and left behind (its local Ray's agents outlive a killed driver),
    and wait until none of it runs any more, so nothing writes into the output directory afterwards."""
    deadline = time.monotonic() + 30
    while left := _live_in_session(proc.pid):
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert time.monotonic() < deadline, f"processes of the killed job still running: {left}"
        time.sleep(0.2)


def _live_in_session(session_id: int) -> list[int]:
    """Pids of the running (not zombie) processes of a session, from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def test_item_metadata_and_cli(tmp_path):
    paths, _ = random_log(tmp_path, seed=6, num_files=1)
    (tmp_path / "items.jsonl").write_text(
        "".join(
            json.dumps({"item": f"i{k}", "title": f"T{k}", "brand": "B", "categories": [["c", "d"]]}) + "\n"
            for k in range(5)
        )
    )
    config = tmp_path / "prep.yaml"
    config.write_text(
        f"input:\n  format: csv\n  paths: [{paths[0]}]\n  item_metadata: {tmp_path / 'items.jsonl'}\n"
        f"output:\n  dir: {tmp_path / 'out'}\n"
    )
    assert main(["--config", str(config), "max_seq_len=20"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    items = vocab(tmp_path / "out", "items")
    assert manifest["config"]["max_seq_len"] == 20
    assert manifest["item_metadata"]["num_items_with_metadata"] == sum(f"i{k}" in items for k in range(5)) > 0
    meta = pq.read_table(tmp_path / "out" / "items/metadata.parquet").to_pylist()
    assert len(meta) == len(items) and meta[-1]["title"] is None  # the rarest item has no metadata
    assert meta[items["i3"] - 1] == {
        "dense_id": items["i3"],
        "title": "T3",
        "brand": "B",
        "categories": ["c", "d"],
        "description": None,
    }
    assert main(["--config", str(config), "filters.nope=1"]) == 2


def test_events_filter_and_exact_duplicate_dedup(tmp_path):
    (tmp_path / "ev.tsv").write_text(
        "u\ti\tt\tkind\n"
        "a\tx\t1\tclick\n"
        "a\tx\t1\tclick\n"  # exact duplicate
        "a\tx\t2\tclick\n"  # same item again later: kept with dedup_key=user_item_timestamp
        "a\ty\t3\tview\n"  # filtered by filters.events
        "a\tz\t4\tbuy\n"
    )
    overrides = [
        f"input.paths=[{tmp_path / 'ev.tsv'}]",
        "input.format=tsv",
        "input.columns={user: u, item: i, timestamp: t, event: kind}",
        "filters.events=[click, buy]",
        "filters.dedup=keep_first",
        "filters.dedup_key=user_item_timestamp",
        "ray.num_buckets=16",  # 15 empty buckets
    ]
    manifest = run(tmp_path / "out", overrides)
    assert manifest["filtered"]["events"] == 1 and manifest["filtered"]["dedup"] == 1
    (row,) = read_split(tmp_path / "out", manifest, "test")
    assert row["events"] == ["click", "click", "buy"] and row["timestamps"] == [1, 2, 4]
    assert "ratings" not in row


def test_cold_start_split_holds_items_out_of_training(tmp_path):
    """split.cold_items_fraction: the cold items appear in no train, valid or older row, only as test
    targets; every other interaction stays, in order; the rows equal a brute-force rebuild."""
    from data_pipeline.transform import cold_items

    paths, interactions = random_log(tmp_path, seed=3)
    overrides = [paths_override(paths), *CSV_COLUMNS, "max_seq_len=6", "split.older_windows=true"]
    manifest = run(tmp_path / "out", [*overrides, "split.cold_items_fraction=0.3", "split.cold_items_seed=5"])
    out = tmp_path / "out"
    cold = set(pq.read_table(out / manifest["cold_items"]["path"])["dense_id"].to_pylist())
    num_items = manifest["num_items"]
    assert 0.15 * num_items < len(cold) < 0.45 * num_items, (len(cold), num_items)
    # The same seed picks the same items in any process; another seed picks others.
    raw = pq.read_table(out / "vocab/items.parquet")["raw_id"]
    assert cold == {i + 1 for i in np.flatnonzero(cold_items(raw, 0.3, 5))}
    assert cold != {i + 1 for i in np.flatnonzero(cold_items(raw, 0.3, 6))}

    # Brute force: each user's full sequence (the uncut test row), cold items removed but the last.
    full = reference(interactions, max_seq_len=10_000)["splits"]["test"]
    expected: dict[str, list[tuple]] = {"train": [], "valid": [], "test": []}
    num_cold_targets = 0
    for uid, items, ts in full:
        kept = [(i, t) for k, (i, t) in enumerate(zip(items, ts)) if i not in cold or k == len(items) - 1]
        if len(kept) < 3:
            continue
        num_cold_targets += kept[-1][0] in cold
        for name, end in (("train", len(kept) - 2), ("valid", len(kept) - 1), ("test", len(kept))):
            part = kept[:end][-7:]
            expected[name].append((uid, [i for i, _ in part], [t for _, t in part]))
    assert output_rows(out, manifest) == expected
    assert manifest["cold_items"]["cold_test_targets"] == num_cold_targets > 0
    for r in read_split(out, manifest, "older"):
        assert not cold & set(r["item_ids"]), r["user_id"]


def test_cold_start_fraction_out_of_range_is_refused(tmp_path):
    paths, _ = random_log(tmp_path, seed=3, num_users=10)
    with pytest.raises(ConfigError, match=r"split.cold_items_fraction.*\[0, 1\)"):
        run(tmp_path / "out", [paths_override(paths), *CSV_COLUMNS, "split.cold_items_fraction=1.5"])


def test_embedded_ray_beside_a_cluster_started_with_ray_start(tmp_path):
    """With a cluster from `ray start --head` on the machine, prepare without ray.address still starts
    its own local Ray: a bare ray.init() joins that cluster and refuses ray.num_cpus."""
    import secrets
    import socket

    paths, _ = random_log(tmp_path, seed=9, num_files=1)
    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    ray_cli = str(Path(sys.executable).absolute().with_name("ray"))
    head_env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    cmd = [ray_cli, "start", "--head", "--block", f"--port={port}", "--num-cpus=1", "--include-dashboard=false",
           "--disable-usage-stats"]  # fmt: skip
    with open(tmp_path / "head.log", "wb") as log:
        head = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=head_env)
    try:
        deadline = time.monotonic() + 180
        while not (tmp_path / "head.log").read_text(errors="replace").count("Ray runtime started"):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()
            time.sleep(0.5)
        prep = [sys.executable, "-m", "data_pipeline", "prepare", *CSV_COLUMNS, paths_override(paths),
                f"output.dir={tmp_path / 'out'}", "ray.num_cpus=1"]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        done = subprocess.run(prep, cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_interactions"] > 0
    finally:
        head.terminate()
        head.wait(timeout=120)
        # `ray start` leaves the address of its (now stopped) cluster for bare ray.init() calls to find.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()
