"""The cold-start split end to end: prepare holds items out of training, the trainer scores the test
users whose target is such an item on their own (test/cold/*), recomputed here from the predictions."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT, TINY_MODEL, run_train

pytestmark = pytest.mark.slow


def test_cold_items_are_scored_on_their_own(tmp_path):
    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare
    from data_pipeline.synthetic import GenerateConfig, generate

    log = generate(GenerateConfig(output_dir=str(tmp_path / "raw"), num_users=300, num_items=100, mean_seq_len=15,
                                  num_topics=10, with_item_text=False, seed=4))  # fmt: skip
    data = tmp_path / "prepared"
    manifest = prepare(load_config(PrepareConfig, ROOT / "configs/data/synthetic.yaml", [
        f"input.paths=[{log}]", "input.item_metadata=null", f"output.dir={data}", "max_seq_len=20",
        "ray.num_cpus=2", "split.cold_items_fraction=0.2"]))  # fmt: skip
    num_cold_targets = manifest["cold_items"]["cold_test_targets"]
    assert num_cold_targets > 5
    out = tmp_path / "run"
    run_train([f"data.dir={data}", *TINY_MODEL, "run.epochs=2", "eval.top_k=10"], out, nproc=1)
    test = json.loads((out / "final_metrics.json").read_text())["test"]
    assert test["cold/num_users"] == num_cold_targets
    # Recompute from the predictions file: the rows whose target is a cold item.
    cold_dense = set(pq.read_table(data / "vocab/cold_items.parquet")["dense_id"].to_pylist())
    vocab = pq.read_table(data / "vocab/items.parquet")
    cold_raw = {
        r for r, d in zip(vocab["raw_id"].to_pylist(), vocab["dense_id"].to_pylist()) if d in cold_dense
    }
    rows = pq.read_table(out / "test_predictions.parquet").to_pylist()
    cold_rows = [r for r in rows if r["target_item_id"] in cold_raw]
    assert len(cold_rows) == num_cold_targets
    hits = sum(r["target_item_id"] in r["top_item_ids"][:10] for r in cold_rows)
    assert test["cold/hr@10"] == pytest.approx(hits / len(cold_rows), abs=1e-12)
    # An ID model never saw these items: it reaches them less often than the others.
    assert test["cold/hr@10"] < test["hr@10"]
