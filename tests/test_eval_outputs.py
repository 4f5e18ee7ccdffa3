"""Evaluation outputs that must hold at catalogue and user counts far beyond the fixtures: the
predictions file written in chunks from memory-mapped per-rank parts, and the popularity baseline
with the whole history excluded, each against a straightforward recomputation."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed as dist

from train.config import load_train_config
from train.evaluation import Evaluator, UserHistory, _PredictionParts, evaluate_popularity
from train.metrics import RetrievalMetrics, item_counts, rank_of_targets
from train.reader import SequenceDataset, raw_id_column, raw_ids_by_dense


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_predictions_are_written_in_user_order_chunk_by_chunk(synthetic_data, tmp_path, one_process_group):
    """Parts of two "ranks" with interleaved users, merged 7 users at a time: the same file as a sort.
    The lists are 3 wide with eval.top_k=5, as retrieval's are when the catalogue is smaller than top_k."""
    from train.distributed import DistInfo

    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    cfg = load_train_config(None, [f"data.dir={synthetic_data}", "eval.top_k=5"])
    # Rank 0 of 2 merges both ranks' parts (the barriers run on a 1-process group).
    evaluator = Evaluator(cfg, DistInfo(0, 2, 0, torch.device("cpu"), "gloo"), manifest)
    path = tmp_path / "test_predictions.parquet"
    gen = np.random.default_rng(0)
    users = gen.permutation(np.arange(1, 41))
    targets = gen.integers(1, manifest["num_items"] + 1, 40)
    top = gen.integers(0, manifest["num_items"] + 1, (40, 3))
    for rank, rows in enumerate((np.arange(0, 40, 2), np.arange(1, 40, 2))):
        parts = _PredictionParts(path, rank, 3)
        for chunk in np.array_split(rows, 3):  # several eval batches per rank
            parts.add(users[chunk], targets[chunk], top[chunk])
        parts.close()
    evaluator._write_predictions(path, chunk_rows=7)

    written = pq.read_table(path)
    assert written.num_rows == 40 and pq.ParquetFile(path).metadata.num_row_groups == 6
    item_raw, user_raw = (
        _vocab_by_hand(synthetic_data / "vocab" / f"{w}.parquet") for w in ("items", "users")
    )
    order = np.argsort(users)
    assert written.column("user_id").to_pylist() == [user_raw[u] for u in users[order]]
    assert written.column("target_item_id").to_pylist() == [item_raw[t] for t in targets[order]]
    assert written.column("top_item_ids").to_pylist() == [[item_raw[i] for i in row] for row in top[order]]
    assert not list(tmp_path.glob(".test_predictions.rank*"))  # the parts are gone


def _vocab_by_hand(path) -> dict[int, str]:
    """Dense id -> raw id as text, row by row (0, padding, -> "")."""
    return {0: "", **{row["dense_id"]: str(row["raw_id"]) for row in pq.read_table(path).to_pylist()}}


def test_raw_id_column_maps_every_dense_id_and_refuses_a_broken_vocabulary(synthetic_data, tmp_path):
    import pyarrow as pa

    path = synthetic_data / "vocab" / "items.parquet"
    by_hand = _vocab_by_hand(path)
    column = raw_id_column(path)
    assert column.type == pa.string() and column.to_pylist() == [by_hand[d] for d in range(len(by_hand))]
    assert list(raw_ids_by_dense(path)) == column.to_pylist()
    ints = pa.table(
        {"raw_id": pa.array([30, 10, 20], pa.int64()), "dense_id": pa.array([3, 1, 2], pa.int64())}
    )
    pq.write_table(ints, tmp_path / "ints.parquet")  # integer raw ids come back as their text
    assert raw_id_column(tmp_path / "ints.parquet").to_pylist() == ["", "10", "20", "30"]
    pq.write_table(ints.slice(0, 2), tmp_path / "gap.parquet")  # dense ids 3, 1: 2 is missing
    with pytest.raises(ValueError, match="gap.parquet: dense ids are not 1..2; prepare the data again"):
        raw_id_column(tmp_path / "gap.parquet")


def test_popularity_with_all_history_equals_brute_force(synthetic_data):
    """evaluate_popularity(history=UserHistory) against rank_of_targets on the count matrix, with each
    user's train, older and eval-row items gathered here from the split files in plain Python."""
    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    num_items = manifest["num_items"]
    history = UserHistory.from_splits(synthetic_data, manifest)
    got = evaluate_popularity(synthetic_data, "test", batch_size=64, history=history)

    seen: dict[int, set[int]] = {}
    for split in ("train", "older"):
        for row in pq.read_table(synthetic_data / split).to_pylist():
            seen.setdefault(row["user_id"], set()).update(row["item_ids"])
    counts = torch.zeros(num_items + 1, dtype=torch.long)
    for batch in SequenceDataset(synthetic_data, "train", 64, shuffle=False):
        counts += item_counts(batch.item_ids, num_items)
    metrics = RetrievalMetrics()
    num_extra = 0
    for row in pq.read_table(synthetic_data / "test").to_pylist():
        items, target = row["item_ids"], row["item_ids"][-1]
        excluded = sorted(set(items[:-1]) | seen.get(row["user_id"], set()))
        num_extra += len(set(excluded) - set(items[:-1]))
        ranks = rank_of_targets(
            counts.double()[None],
            torch.tensor([target]),
            torch.tensor(excluded),
            torch.tensor([0, len(excluded)]),
        )
        metrics.update(ranks)
    expected = metrics.compute(all_reduce=False)
    assert num_extra > 100  # the older rows really add exclusions on this fixture
    assert got == pytest.approx(expected, abs=1e-12)
    # And it differs from the row-only exclusion (else the check above proves little).
    assert evaluate_popularity(synthetic_data, "test", batch_size=64) != got
