"""TIGER on the trainer, beyond what tests/test_trainer.py checks for every family (sharded == single,
ZeRO stages, killed-and-resumed): its predictions file, its unconstrained decoding, its config errors."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from data_pipeline.semantic_ids.table import read_semantic_ids
from tests.conftest import run_train
from tests.test_trainer import EXACT
from train.config import load_train_config
from train.distributed import DistInfo
from train.reader import load_manifest
from train.tasks.tiger import TigerTask, _drop_history


@pytest.mark.distributed
@pytest.mark.slow
def test_predictions_reproduce_the_metrics_and_hold_only_valid_unseen_items(train_runs, synthetic_data):
    run = train_runs([*EXACT, "zero.stage=0"], nproc=2, family="tiger")  # shared with test_trainer
    final = run.final
    pred = pq.read_table(run.output_dir / "test_predictions.parquet").to_pydict()
    assert len(pred["user_id"]) == final["test"]["num_users"]
    # Ranks recomputed from the file alone give the reported metrics.
    ranks = []
    for target, top in zip(pred["target_item_id"], pred["top_item_ids"]):
        ranks.append(top.index(target) if target in top else 10**9)
    ranks = np.array(ranks)
    assert final["test"]["hr@10"] == pytest.approx(float(np.mean(ranks < 10)), abs=1e-9)
    assert final["test"]["hr@5"] == pytest.approx(float(np.mean(ranks < 5)), abs=1e-9)
    # Every listed item is an item of the catalogue (constrained decoding), and none is in the user's
    # test history (excluded), read from the raw split files, not from the trainer's batches.
    items = set(pq.read_table(synthetic_data / "vocab" / "items.parquet").column("raw_id").to_pylist())
    users = pq.read_table(synthetic_data / "vocab" / "users.parquet").to_pydict()
    raw_user = dict(zip(users["dense_id"], users["raw_id"]))
    raw_item = dict(
        zip(
            *pq.read_table(synthetic_data / "vocab" / "items.parquet", columns=["dense_id", "raw_id"])
            .to_pydict()
            .values()
        )
    )
    history = {}
    for entry in load_manifest(synthetic_data)["splits"]["test"]["files"]:
        t = pq.read_table(synthetic_data / entry["path"]).to_pydict()
        for u, seq in zip(t["user_id"], t["item_ids"]):
            history[raw_user[u]] = {raw_item[i] for i in seq[:-1]}
    for user, target, top in zip(pred["user_id"], pred["target_item_id"], pred["top_item_ids"]):
        listed = [i for i in top if i != ""]
        assert set(listed) <= items and len(set(listed)) == len(listed)
        assert not (set(listed) - {target}) & history[user], user


@pytest.mark.distributed
def test_unconstrained_decoding_reports_its_invalid_rate(family_args, tmp_path):
    out = tmp_path / "free"
    run_train([*family_args("tiger"), "run.epochs=1", "model.decode=unconstrained"], out, nproc=1)
    final = json.loads((out / "final_metrics.json").read_text())
    # 3 levels of 8 codes + a collision level: far more tuples than the 120 items, so a barely
    # trained model emits some invalid ones; the rate is a share of the returned tuples.
    assert 0.0 < final["test"]["invalid_id_rate"] <= 1.0
    assert final["decode"] == {"mode": "unconstrained", "beam_size": 10}


def _task(synthetic_data, synthetic_semantic_ids, *overrides):
    cfg = load_train_config(
        None, [f"data.dir={synthetic_data}", "model.name=tiger", f"model.semantic_ids_dir={synthetic_semantic_ids}",
               "eval.hr_at=[1,5,10]", "eval.ndcg_at=[5,10]", *overrides],
    )  # fmt: skip
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    return TigerTask(cfg, info, load_manifest(synthetic_data))


def test_bad_settings_are_one_clear_error(synthetic_data, synthetic_semantic_ids, tmp_path):
    with pytest.raises(ValueError, match="loss.* configures the retrieval task"):
        _task(synthetic_data, synthetic_semantic_ids, "loss.negatives=full")
    with pytest.raises(ValueError, match="model.beam_size=20"):
        _task(synthetic_data, synthetic_semantic_ids, "eval.hr_at=[1,50]")
    with pytest.raises(ValueError, match="model.semantic_ids_dir is empty"):
        _task(synthetic_data, "")
    # A table made for other items: the prepared items without codes are counted and named.
    table = read_semantic_ids(synthetic_semantic_ids)
    from data_pipeline.semantic_ids.table import SemanticIdTable, write_semantic_ids

    write_semantic_ids(
        tmp_path / "partial",
        SemanticIdTable(table.item_ids[:-3], table.codes[:-3], table.codebook_sizes, dict(table.manifest)),
    )
    with pytest.raises(ValueError, match="3 of 120 prepared items have no semantic ID"):
        _task(synthetic_data, tmp_path / "partial")


def test_codes_follow_the_dense_ids_through_the_raw_ids(synthetic_data, synthetic_semantic_ids):
    task = _task(synthetic_data, synthetic_semantic_ids)
    table = read_semantic_ids(synthetic_semantic_ids)
    by_raw = dict(zip(table.item_ids.tolist(), map(tuple, table.codes.tolist())))
    vocab = pq.read_table(synthetic_data / "vocab" / "items.parquet").to_pydict()
    for dense, raw in zip(vocab["dense_id"], vocab["raw_id"]):
        assert tuple(task.codes_NL[dense].tolist()) == by_raw[raw]


def test_drop_history_keeps_order_and_the_target():
    top = torch.tensor([[5, 3, 9, 7, 0], [4, 2, 6, 1, 8]])
    hist_values = torch.tensor([3, 7, 2, 6])  # row 0: {3, 7}; row 1: {2, 6}, and 6 is also the target
    hist_offsets = torch.tensor([0, 2, 4])
    targets = torch.tensor([9, 6])
    out = _drop_history(top, hist_values, hist_offsets, targets)
    assert out.tolist() == [[5, 9, 0, 0, 0], [4, 6, 1, 8, 0]]
