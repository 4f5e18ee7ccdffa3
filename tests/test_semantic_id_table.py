"""The semantic-ID table format: round trip, collision token, random baseline, validation errors,
and the converter of the published Amazon Beauty reference IDs (on the real file)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.semantic_ids.table import (
    SemanticIdTable,
    add_collision_token,
    convert_reference,
    random_semantic_ids,
    read_semantic_ids,
    write_semantic_ids,
)
from tests.conftest import shared_data_dir


def _table(n: int = 50, seed: int = 1) -> SemanticIdTable:
    return random_semantic_ids([f"item{i}" for i in range(n)], num_levels=2, codebook_size=4, seed=seed)


def test_round_trip_unchanged(tmp_path):
    table = _table()
    table.manifest["note"] = "kept"
    out = write_semantic_ids(tmp_path / "ids", table)
    back = read_semantic_ids(out)
    assert back.item_ids.tolist() == table.item_ids.tolist()
    assert back.codes.dtype == np.int64 and np.array_equal(back.codes, table.codes)
    assert back.codebook_sizes == table.codebook_sizes
    m = back.manifest
    assert (m["format"], m["num_items"], m["num_levels"], m["source"], m["seed"], m["note"]) == (
        "semantic_ids/v1", 50, 3, "random", 1, "kept",
    )  # fmt: skip
    schema = pq.read_schema(out / "semantic_ids.parquet")
    assert schema.field("item_id").type == pa.string() and schema.field("codes").type == pa.list_(pa.int32())
    assert not list(out.glob(".*tmp"))


def test_collision_token_brute_force():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 3, size=(200, 2))  # 9 possible tuples for 200 items: many collisions
    out, rate = add_collision_token(codes)
    assert out.shape == (200, 3) and np.array_equal(out[:, :2], codes)
    assert len({tuple(r) for r in out.tolist()}) == 200
    # Brute force: the k-th row (in row order) with a given tuple gets token k.
    seen: Counter = Counter()
    for row, token in zip(codes.tolist(), out[:, 2].tolist()):
        assert token == seen[tuple(row)]
        seen[tuple(row)] += 1
    counts = Counter(tuple(r) for r in codes.tolist())
    assert rate == pytest.approx(sum(c for c in counts.values() if c > 1) / 200)
    unique_codes = np.arange(10).reshape(5, 2)
    out, rate = add_collision_token(unique_codes)
    assert rate == 0.0 and not out[:, 2].any()


def test_random_ids_deterministic_and_unique():
    items = [f"i{i}" for i in range(3000)]
    a = random_semantic_ids(items, num_levels=2, codebook_size=16, seed=7)
    b = random_semantic_ids(list(reversed(items)), num_levels=2, codebook_size=16, seed=7)
    c = random_semantic_ids(items, num_levels=2, codebook_size=16, seed=8)
    assert a.item_ids.tolist() == b.item_ids.tolist() and np.array_equal(a.codes, b.codes)
    assert not np.array_equal(a.codes, c.codes)
    assert (
        len({tuple(r) for r in a.codes.tolist()}) == 3000
    )  # 3000 items in 256 prefixes: unique only via the token
    assert a.manifest["collision_rate"] > 0.9 and a.codebook_sizes[:2] == [16, 16]
    assert a.codebook_sizes[2] == a.codes[:, 2].max() + 1


def test_random_ids_command_covers_the_vocabulary(synthetic_data, synthetic_semantic_ids, tmp_path, caplog):
    vocab = pq.read_table(synthetic_data / "vocab" / "items.parquet").column("raw_id").to_pylist()
    table = read_semantic_ids(synthetic_semantic_ids)
    expected = random_semantic_ids(vocab, num_levels=3, codebook_size=8, seed=0)
    assert sorted(table.item_ids.tolist()) == sorted(str(v) for v in vocab)
    assert table.item_ids.tolist() == expected.item_ids.tolist() and np.array_equal(
        table.codes, expected.codes
    )
    assert table.manifest["source"] == "random" and table.manifest["seed"] == 0

    from data_pipeline.semantic_ids.random_ids import main as random_ids_main

    assert random_ids_main(["--prepared", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o")]) == 1
    assert "nowhere/vocab/items.parquet not found" in caplog.text and not (tmp_path / "o").exists()


def _expect_error(tmp_path, mutate, match):
    out = write_semantic_ids(tmp_path / "ids", _table())
    mutate(out)
    with pytest.raises(ValueError, match=match):
        read_semantic_ids(out)


def _rewrite_parquet(out, ids, codes):
    """Write a parquet with the given rows and a matching checksum, bypassing the writer's validation."""
    arrow = pa.table({"item_id": pa.array(ids, pa.string()), "codes": pa.array(codes, pa.list_(pa.int32()))})
    pq.write_table(arrow, out / "semantic_ids.parquet")
    manifest = json.loads((out / "manifest.json").read_text())
    import hashlib

    manifest["sha256"] = hashlib.sha256((out / "semantic_ids.parquet").read_bytes()).hexdigest()
    manifest["num_items"] = len(ids)
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_bad_inputs_give_clear_errors(tmp_path):
    _expect_error(tmp_path / "a", lambda out: (out / "manifest.json").unlink(), r"manifest\.json not found")
    _expect_error(
        tmp_path / "b",
        lambda out: (out / "semantic_ids.parquet").unlink(),
        r"semantic_ids\.parquet not found",
    )

    def corrupt(out):
        with open(out / "semantic_ids.parquet", "ab") as f:
            f.write(b"x")

    _expect_error(tmp_path / "c", corrupt, r"does not match the manifest.*write the directory again")
    base = _table()
    ids, codes = base.item_ids.tolist(), base.codes.tolist()
    _expect_error(
        tmp_path / "d", lambda out: _rewrite_parquet(out, ids, codes[:-1] + [codes[-1][:2]]),
        rf"item '{ids[-1]}' \(row 49\) has 2 codes, the manifest says num_levels=3",
    )  # fmt: skip
    _expect_error(
        tmp_path / "e", lambda out: _rewrite_parquet(out, ids, [[9, 0, 0]] + codes[1:]),
        rf"item '{ids[0]}' \(row 0\) has code 9 at level 0, outside its codebook \[0, 4\)",
    )  # fmt: skip
    _expect_error(
        tmp_path / "f", lambda out: _rewrite_parquet(out, ids[:-1] + [ids[0]], codes),
        rf"item id '{ids[0]}' appears more than once",
    )  # fmt: skip
    _expect_error(
        tmp_path / "g", lambda out: _rewrite_parquet(out, ids, codes[:-1] + [codes[3]]),
        rf"items '{ids[3]}' \(row 3\) and '{ids[-1]}' \(row 49\) have the same codes",
    )  # fmt: skip
    # The writer refuses the same tables, so a bad table never reaches disk.
    with pytest.raises(ValueError, match="have the same codes.*add_collision_token"):
        write_semantic_ids(
            tmp_path / "h",
            SemanticIdTable(np.array(["a", "b"], dtype=object), np.zeros((2, 2), np.int64), [2, 2]),
        )
    assert not (tmp_path / "h" / "manifest.json").exists()


@pytest.mark.shared_data
def test_convert_reference_real_file(tmp_path):
    path = shared_data_dir("amazon-beauty") / "reference_semantic_ids.json"
    raw = json.loads(path.read_text())
    table = convert_reference(path, tmp_path / "ref")
    assert table.num_items == len(raw) == 12101
    # Raw id = key + 1, and the first four levels are the reference's codes.
    row_of = {item: i for i, item in enumerate(table.item_ids.tolist())}
    for key in ("0", "1", "5000", "12100"):
        expected = [int(tok.split("_")[1].rstrip(">")) for tok in raw[key]]
        assert table.codes[row_of[str(int(key) + 1)], :4].tolist() == expected
    # The reference's 4-level IDs are NOT all unique; the appended token makes them so.
    ref_tuples = Counter(tuple(v) for v in raw.values())
    assert table.manifest["reference_num_unique_tuples"] == len(ref_tuples) < 12101
    assert table.num_levels == 5 and len({tuple(r) for r in table.codes.tolist()}) == 12101
    colliding = sum(c for c in ref_tuples.values() if c > 1)
    assert table.manifest["collision_rate"] == pytest.approx(colliding / 12101)
    assert table.codebook_sizes[4] == max(ref_tuples.values())
    # Every item id of the interaction file (what `prepare` turns into raw_id) has codes.
    item_ids = {
        line.split("\t")[1] for line in (path.parent / "interactions.tsv").read_text().splitlines()[1:]
    }
    assert item_ids <= set(row_of)
    # A prepared vocabulary with an item the reference lacks is reported with the count.
    vocab = tmp_path / "prepared" / "vocab"
    vocab.mkdir(parents=True)
    pq.write_table(pa.table({"raw_id": ["1", "2", "99999", "88888"]}), vocab / "items.parquet")
    with pytest.raises(ValueError, match=r"2 of the 4 items in .*items\.parquet have no codes"):
        convert_reference(path, tmp_path / "ref2", prepared_dir=tmp_path / "prepared")


@pytest.mark.slow
@pytest.mark.shared_data
def test_convert_reference_against_real_prepared_beauty(tmp_path):
    """The real `prepare` job on Amazon Beauty, then the converter: every prepared item has codes."""
    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare
    from tests.conftest import ROOT

    data = shared_data_dir("amazon-beauty")
    cfg = load_config(
        PrepareConfig, ROOT / "configs" / "data" / "amazon_beauty.yaml",
        [f"input.paths=[{data / 'interactions.tsv'}]", f"output.dir={tmp_path / 'prepared'}", "ray.num_cpus=1"],
    )  # fmt: skip
    prepare(cfg)
    table = convert_reference(
        data / "reference_semantic_ids.json", tmp_path / "ref", prepared_dir=tmp_path / "prepared"
    )
    prepared_ids = pq.read_table(tmp_path / "prepared" / "vocab" / "items.parquet")["raw_id"].to_pylist()
    assert len(prepared_ids) == 12101 and set(prepared_ids) == set(table.item_ids.tolist())
    assert table.manifest["num_items_not_prepared"] == 0
