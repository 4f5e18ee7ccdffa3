"""Readers and validation of the prepare job, without Ray: every format, chunk boundaries, bad rows."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cluster.config import ConfigError, from_dict, load_config
from data_pipeline.config import InputConfig, PrepareConfig
from data_pipeline.readers import plan_read_tasks, read_records, resolve_sources
from data_pipeline.transform import stable_hash, validate_records


def _input(**kwargs) -> InputConfig:
    return from_dict(InputConfig, kwargs, prefix="input")


def _read_all(cfg: InputConfig, chunk_bytes: int = 1 << 20) -> dict[str, list]:
    """Read every file of ``cfg`` the way the job does; returns typed records and rejects with
    1-based row numbers, in file order."""
    sources = resolve_sources(cfg)
    tasks = plan_read_tasks(sources, chunk_bytes)
    fields = set(sources[0].fields)
    out: dict[str, list] = {k: [] for k in ("user", "item", "timestamp", "rating", "pos", "src")}
    rejects: list[tuple[str, int, str, str]] = []
    lines_before: dict[int, int] = {}
    for task in tasks:
        src = sources[task.file_index]
        base = lines_before.get(task.file_index, 0)
        num_lines = 0
        for records in read_records(src, task, chunk_bytes):
            num_lines += records.num_lines
            v = validate_records(records, src.index, cfg.timestamp_format, "rating" in fields, False)
            for k in out:
                if k in v.table.column_names:
                    out[k].extend(v.table[k].to_pylist())
            for line, reason, raw in zip(
                records.rejects["line"], records.rejects["reason"], records.rejects["raw"]
            ):
                rejects.append((src.path, base + line + 1, reason, raw))
            for line, reason, raw in zip(v.reject_line, v.reject_reason, v.reject_raw):
                rejects.append((src.path, base + int(line) + 1, reason, raw))
        lines_before[task.file_index] = base + num_lines
    out["rejects"] = sorted(rejects)
    return out


def test_csv_with_header_maps_columns_and_rejects_bad_rows(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text(
        "rating,item,user,timestamp\n"  # columns in an unusual order: mapped by name
        "5,i1,u1,100\n"
        '4,"i2",u1,101\n'  # quoted field
        "3,i3,u1\n"  # truncated line: wrong column count
        "nan,i4,u2,102\n"  # NaN rating
        "2,i5,u2,yesterday\n"  # unparseable timestamp
        ",i6,u2,103\n"  # missing rating
        "1,i7,,104\n"  # missing user
        "\n"  # blank line: skipped, not a reject
        "1,i8,ü€,105.7\r\n"  # unicode id, decimal timestamp, CRLF
        "1,i9,u3,106,extra\n"  # wrong column count
    )
    got = _read_all(_input(format="csv", paths=[str(path)], columns={"rating": "rating"}))
    assert got["user"] == ["u1", "u1", "ü€"]
    assert got["item"] == ["i1", "i2", "i8"]
    assert got["timestamp"] == [100, 101, 105]
    assert got["rating"] == [5.0, 4.0, 1.0]
    assert [(row, reason) for _, row, reason, _ in got["rejects"]] == [
        (4, "wrong_column_count"),
        (5, "nan_rating"),
        (6, "bad_timestamp"),
        (7, "missing_rating"),
        (8, "missing_user"),
        (11, "wrong_column_count"),
    ]
    assert got["rejects"][0][3] == "3,i3,u1"
    # pos is the byte offset of the line: file order.
    assert got["pos"] == sorted(got["pos"])


def test_chunked_read_equals_whole_file_read(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["user\titem\tts"]
    for i in range(3000):
        if i % 397 == 0:
            lines.append(f"u{i % 50}\tbroken")  # a reject every ~400 lines
        else:
            lines.append(f"u{rng.integers(50)}\ti{rng.integers(100)}\t{rng.integers(1_000_000)}")
    path = tmp_path / "log.tsv"
    path.write_text("\n".join(lines))  # no trailing newline
    cfg = _input(format="tsv", paths=[str(path)], columns={"timestamp": "ts"})
    whole = _read_all(cfg, chunk_bytes=1 << 24)
    chunked = _read_all(cfg, chunk_bytes=1024)  # ~35 tasks, boundaries inside lines
    assert len(plan_read_tasks(resolve_sources(cfg), 1024)) > 20
    assert chunked == whole
    assert len(whole["user"]) + len(whole["rejects"]) == 3000
    assert [r[1] for r in whole["rejects"]] == [i + 2 for i in range(3000) if i % 397 == 0]


def test_sequences_format_and_gzip(tmp_path):
    text = "u1 a b c\nu2  d\te\n\nu3\nü x y\n"
    (tmp_path / "seq.txt").write_text(text)
    with gzip.open(tmp_path / "seq.txt.gz", "wt") as f:
        f.write(text)
    for name in ("seq.txt", "seq.txt.gz"):
        got = _read_all(_input(format="sequences", paths=[str(tmp_path / name)]), chunk_bytes=8)
        assert got["user"] == ["u1", "u1", "u1", "u2", "u2", "ü", "ü"]
        assert got["item"] == ["a", "b", "c", "d", "e", "x", "y"]
        assert got["timestamp"] == [None] * 7
        assert got["pos"] == sorted(got["pos"]) and len(set(got["pos"])) == 7
        assert [(r[1], r[2]) for r in got["rejects"]] == [(4, "no_items")]


def test_jsonl_typed_values_and_bad_json(tmp_path):
    path = tmp_path / "events.jsonl"
    rows = [
        {"uid": 7, "iid": "a", "t": 1000, "r": 4.5},
        {"uid": 7, "iid": "b", "t": 1001.9, "r": 3},
        {"uid": "x", "iid": "c", "t": "1002", "r": None},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n{not json\n")
    cfg = _input(
        format="jsonl",
        paths=[str(path)],
        columns={"user": "uid", "item": "iid", "timestamp": "t", "rating": "r"},
    )
    got = _read_all(cfg)
    # Mixed types (7 and "x") force the line-by-line path; ids are strings either way.
    assert got["user"] == ["7", "7"]
    assert got["timestamp"] == [1000, 1001]
    assert [(r[1], r[2]) for r in got["rejects"]] == [(3, "missing_rating"), (4, "bad_json")]


def test_parquet_input_rejects_nan_and_renders_raw(tmp_path):
    table = pa.table(
        {
            "u": pa.array([1, 2, 3], pa.int64()),
            "i": ["a", "b", None],
            "ts": pa.array([10, 20, 30], pa.int64()),
            "score": [1.0, float("nan"), 2.0],
        }
    )
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=2)
    cfg = _input(
        format="parquet",
        paths=[str(tmp_path / "x.parquet")],
        columns={"user": "u", "item": "i", "timestamp": "ts", "rating": "score"},
    )
    got = _read_all(cfg)
    assert got["user"] == ["1"] and got["item"] == ["a"]
    assert [(r[1], r[2]) for r in got["rejects"]] == [(2, "nan_rating"), (3, "missing_item")]
    assert json.loads(got["rejects"][1][3]) == {"user": 3, "item": None, "timestamp": 30, "rating": 2.0}


def test_movielens_layouts_by_file_name(tmp_path):
    (tmp_path / "ratings.dat").write_text("1::10::5::978300760\n1::11::3::978302109\n")
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n2,20,4.5,1100000000\n")
    (tmp_path / "u.data").write_text("3\t30\t2\t881250949\n")
    got = _read_all(
        _input(
            format="movielens", paths=[str(tmp_path / n) for n in ("ratings.dat", "ratings.csv", "u.data")]
        )
    )
    assert got["user"] == ["1", "1", "2", "3"]
    assert got["item"] == ["10", "11", "20", "30"]
    assert got["rating"] == [5.0, 3.0, 4.5, 2.0]
    assert got["src"] == [0, 0, 1, 2]
    (tmp_path / "movies.dat").write_text("x")
    with pytest.raises(ValueError, match="not a MovieLens ratings file"):
        resolve_sources(_input(format="movielens", paths=[str(tmp_path / "movies.dat")]))


def test_amazon_reviews_json_and_ratings_csv(tmp_path):
    review = {
        "reviewerID": "A1",
        "asin": "B0",
        "overall": 5.0,
        "unixReviewTime": 1318896000,
        "helpful": [0, 0],
    }
    with gzip.open(tmp_path / "reviews_Beauty_5.json.gz", "wt") as f:
        f.write(json.dumps(review) + "\n")
    (tmp_path / "ratings_Beauty.csv").write_text("A2,B1,4.0,1318896001\n")
    cfg = _input(
        format="amazon",
        paths=[str(tmp_path / "reviews_Beauty_5.json.gz"), str(tmp_path / "ratings_Beauty.csv")],
    )
    got = _read_all(cfg)
    assert got["user"] == ["A1", "A2"] and got["item"] == ["B0", "B1"]
    assert got["timestamp"] == [1318896000, 1318896001] and got["rating"] == [5.0, 4.0]


def test_user_errors_name_the_file(tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty\.csv' is empty"):
        resolve_sources(_input(format="csv", paths=[str(empty)]))
    with pytest.raises(ValueError, match="matches no file"):
        resolve_sources(_input(format="csv", paths=[str(tmp_path / "nothing-*.csv")]))
    with pytest.raises(ValueError, match="does not exist"):
        resolve_sources(_input(format="csv", paths=[str(tmp_path / "missing.csv")]))
    bad = tmp_path / "bad_header.csv"
    bad.write_text("userid,item,timestamp\nu1,i1,1\n")
    with pytest.raises(
        ValueError,
        match=r"bad_header\.csv.*no column 'user'.*columns found: \['userid', 'item', 'timestamp'\]",
    ):
        resolve_sources(_input(format="csv", paths=[str(bad)]))
    headerless = tmp_path / "h.tsv"
    headerless.write_text("u1\ti1\n")
    with pytest.raises(ValueError, match="position 2 but lines have 2 fields"):
        resolve_sources(
            _input(
                format="tsv",
                paths=[str(headerless)],
                has_header=False,
                columns={"user": 0, "item": 1, "timestamp": 2},
            )
        )
    twice = tmp_path / "twice.csv"
    twice.write_text("user,item,timestamp\nu,i,1\n")
    with pytest.raises(ValueError, match="listed twice"):
        resolve_sources(_input(format="csv", paths=[str(twice), str(tmp_path / "tw*.csv")]))


def test_config_validation_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match="input.paths"):
        load_config(PrepareConfig, None, ["output.dir=x"])
    with pytest.raises(ConfigError, match="split.temporal_cutoff"):
        load_config(PrepareConfig, None, ["input.paths=[a]", "output.dir=x", "split.method=temporal"])
    with pytest.raises(ConfigError, match="input.columns.user.*has_header is false"):
        load_config(PrepareConfig, None, ["input.paths=[a]", "output.dir=x", "input.has_header=false"])
    with pytest.raises(ConfigError, match="filters.min_seq_len"):
        load_config(PrepareConfig, None, ["input.paths=[a]", "output.dir=x", "filters.min_seq_len=2"])
    with pytest.raises(ConfigError, match="temporal' needs timestamps"):
        load_config(
            PrepareConfig,
            None,
            [
                "input.paths=[a]",
                "output.dir=x",
                "input.format=sequences",
                "split.method=temporal",
                "split.temporal_cutoff=5",
            ],
        )
    cfg = load_config(
        PrepareConfig,
        None,
        [
            "input.paths=[a]",
            "output.dir=x",
            "input.columns.user=0",
            "input.has_header=false",
            "input.columns.item=1",
            "input.columns.timestamp=null",
        ],
    )
    assert cfg.input.columns.user == 0 and cfg.input.columns.timestamp is None


def test_stable_hash_is_deterministic_and_spreads():
    values = pa.array([f"user-{i}" for i in range(20000)] + ["", "ü€"])
    h = stable_hash(values)
    # Known values: the bucket of a user must never change between versions or machines.
    pinned = stable_hash(pa.array(["user-0", "u1", "ü€"])).tolist()
    assert pinned == [14266719068751922305, 4976106909918059907, 15197299233643805378]
    assert len(np.unique(h)) == len(h)
    counts = np.bincount((h % np.uint64(8)).astype(np.int64), minlength=8)
    assert counts.min() > 0.9 * len(h) / 8
    # A sliced array hashes the same as a fresh one.
    assert stable_hash(values.slice(5, 3)).tolist() == h[5:8].tolist()


def test_byte_order_mark_is_not_part_of_the_first_id(tmp_path):
    (tmp_path / "bom.tsv").write_bytes("\ufeffu1\ti1\t5\nu2\ti2\t6\n".encode())
    cfg = _input(
        format="tsv",
        paths=[str(tmp_path / "bom.tsv")],
        has_header=False,
        columns={"user": 0, "item": 1, "timestamp": 2},
    )
    assert _read_all(cfg)["user"] == ["u1", "u2"]
    (tmp_path / "bom.csv").write_bytes("\ufeffuser,item,timestamp\nu1,i1,5\n".encode())
    assert _read_all(_input(format="csv", paths=[str(tmp_path / "bom.csv")]))["user"] == ["u1"]


def test_invalid_utf8_lines_are_rejected_with_their_row(tmp_path):
    (tmp_path / "latin1.tsv").write_bytes(b"user\titem\tts\nu1\ti1\t1\nu\xe9\ti2\t2\nu3\ti3\t3\n")
    got = _read_all(_input(format="tsv", paths=[str(tmp_path / "latin1.tsv")], columns={"timestamp": "ts"}))
    assert got["user"] == ["u1", "u3"]
    assert [(r[1], r[2], r[3]) for r in got["rejects"]] == [(3, "invalid_utf8", "u\ufffd\ti2\t2")]


@pytest.mark.parametrize(
    "body",
    [
        "u1,i1,5,1.0\nu2,i2,6,2\n u3 , i3 ,7, 3 \n",  # clean lines: Arrow's CSV tokenizer splits them
        "u1,i1,5,1\r\nu2,i2,6,2\r\n\r\nu3,i3,7,3\r\n",  # CRLF and an empty CRLF line
        'u1,"i,1",5,1\n"u2",i2,6,2\n',  # quotes are not CSV quoting here: the field count decides
        "u1,i1,5,1\n   \nu2,i2,6\nu3,i3,7,3\n",  # whitespace-only line, a short row
        "u1,i1,5,1\rx\nu2,i2,6,2\n",  # a bare CR inside a line
        "u1,i1,5,1\n\n\nu2,i2,6,2",  # empty lines, no final newline
    ],
)
def test_fast_csv_split_equals_the_general_path(tmp_path, monkeypatch, body):
    """The tokenizer fast path of text pieces gives exactly what splitting line by line gives (or
    falls back to it): same fields, positions, line numbers, blank count and rejects."""
    from data_pipeline import readers

    path = tmp_path / "log.csv"
    path.write_bytes(("user,item,timestamp,rating\n" + body).encode())
    cfg = _input(paths=[str(path)], format="csv", columns={"rating": "rating"})
    split_fast = readers._split_fields_fast
    used: list[bool] = []
    monkeypatch.setattr(
        readers, "_split_fields_fast", lambda *a: used.append(split_fast(*a) is not None) or split_fast(*a)
    )
    fast = _read_all(cfg)
    if body.startswith("u1,i1,5,1.0") or body.startswith("u1,i1,5,1\r\n"):
        assert used == [True], "clean pieces take the fast path"
    monkeypatch.setattr(readers, "_split_fields_fast", lambda *args: None)
    assert _read_all(cfg) == fast


def test_hashed_vocab_lookup_equals_lookup_by_value():
    """Dense ids found by binary search over sorted 64-bit hashes equal those of a lookup by value."""
    from data_pipeline.transform import dense_ids_of, hashed_vocab

    rng = np.random.default_rng(0)
    raw = pa.array(sorted({f"id{x}" for x in rng.integers(0, 10**9, 5000)} | {"", "ü€", "0", "00"}))
    raw = raw.take(pa.array(rng.permutation(len(raw))))  # dense-id order is not raw order
    vocab = hashed_vocab(raw)
    assert vocab is not None
    values = raw.take(pa.array(rng.integers(0, len(raw), 20000)))
    want = np.asarray(pc.index_in(values, value_set=raw), dtype=np.int64) + 1
    assert dense_ids_of(values, vocab).tolist() == want.tolist()
    assert dense_ids_of(values, raw).tolist() == want.tolist()  # the by-value fallback
    assert dense_ids_of(values.slice(0, 0), vocab).tolist() == []
    with pytest.raises(AssertionError, match="in the vocabulary"):
        dense_ids_of(pa.array(["not-an-id"]), vocab)
