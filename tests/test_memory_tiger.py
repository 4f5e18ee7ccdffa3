"""TIGER's memory terms (``TigerMemory`` in train/tasks/tiger.py, reached through the task registry):
parameters against the module, activations against a real step under MemTracker, and the planner on
a TIGER config."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cluster.memory import MARGIN_FIXED_BYTES, MiB, estimate_memory, family_memory
from cluster.plan import ClusterSpec, plan_schedule
from train.config import load_train_config
from train.models.tiger import Tiger, TigerConfig, TigerVocab
from train.tasks.tiger import TigerMemory

CODEBOOKS = [64, 64, 64, 4]
SMALL = dict(num_encoder_layers=2, num_decoder_layers=2, num_heads=2, head_dim=32, d_model=64, d_ff=256)


def test_tiger_num_params_matches_the_module():
    cfg = TigerConfig(**SMALL, relative_num_buckets=16)
    assert TigerMemory(cfg, CODEBOOKS).num_params() == sum(
        p.numel() for p in Tiger(cfg, CODEBOOKS).parameters()
    )


def test_tiger_batch_shapes():
    family = TigerMemory(TigerConfig(**SMALL, max_history_items=5), CODEBOOKS)
    # rows with 3 and 8 model inputs: 11 examples; the longest history is cut to 5 items of 4 codes
    batch = family.batch_from_lengths([3, 8])
    assert (batch.num_tokens, batch.max_len, batch.padded_tokens) == (11, 1 + 4 * 5, 11 * 21)
    assert family.batch_bound(100).padded_tokens == 100 * 21
    assert family.table_shape(10**6) == (TigerVocab(tuple(CODEBOOKS), 2000).vocab_size, 64)


@pytest.mark.parametrize("dropout, examples, history", [(0.1, 64, 10), (0.0, 96, 6)])
def test_tiger_terms_match_memtracker(dropout, examples, history):
    """Predicted activations + attention + loss (CPU kernels) within 5% of MemTracker's measured peak."""
    from cluster.memory_measure import measure_tiger_step

    cfg = TigerConfig(**SMALL, dropout=dropout, max_history_items=history)
    family = TigerMemory(cfg, CODEBOOKS)
    batch = family.batch_bound(examples)
    measured = measure_tiger_step(cfg, CODEBOOKS, examples, batch.max_len)
    terms = family.step_terms(batch, num_items=0, dtype_bytes=4, checkpointing=False, has_timestamps=False,
                              device_type="cpu")  # fmt: skip
    predicted = terms["activations"] + terms["attention"] + terms["loss"]
    assert abs(predicted - measured.activations) / measured.activations < 0.05, (predicted, measured)
    assert measured.params == 4 * family.num_params()


@pytest.fixture
def tiger_cfg(tmp_path):
    sid = tmp_path / "sid"
    sid.mkdir()
    (sid / "manifest.json").write_text(json.dumps({"format": "semantic_ids/v1", "codebook_sizes": CODEBOOKS}))
    overrides = [f"data.dir={tmp_path / 'none'}", f"model.semantic_ids_dir={sid}", "model.max_history_items=10",
                 *(f"model.{k}={v}" for k, v in SMALL.items()), "data.batch_size=256"]  # fmt: skip
    return load_train_config("configs/tiger_beauty.yaml", overrides)


def test_tiger_reaches_the_memory_model_through_its_task(tiger_cfg):
    family = family_memory(tiger_cfg)
    assert isinstance(family, TigerMemory) and family.codebook_sizes == CODEBOOKS
    est = estimate_memory(tiger_cfg, world_size=2, local_world_size=2, num_items=5000,
                          batch=family.batch_bound(512))  # fmt: skip
    rows, width = family.table_shape(5000)
    assert est.terms["embedding_weights"] == rows * width * 4  # data_parallel: the whole token table
    assert est.terms["attention"] == 0  # CUDA's fused kernels keep no [S, S] tensor
    with pytest.raises(ValueError, match="checkpointing is not available"):
        estimate_memory(tiger_cfg, world_size=2, local_world_size=2, num_items=5000,
                        batch=family.batch_bound(512), checkpointing=True)  # fmt: skip


def test_a_tiger_plan_for_a_small_budget_trains_within_it(tiger_cfg):
    """Plan TIGER (CPU kernels) for a simulated small device; the worst batch its budget admits (every
    example with the full history) measured under MemTracker fits the budget and the prediction bounds it."""
    from cluster.memory_measure import measure_tiger_step

    budget = MARGIN_FIXED_BYTES + 96 * MiB
    cluster = dataclasses.replace(ClusterSpec(budget, 1, 1), precision="fp32", device_type="cpu")
    plan = plan_schedule(tiger_cfg, cluster, num_items=5000, mean_row_len=11.0)
    assert plan.fits and plan.schedule.grad_accum_steps > 1 and not plan.schedule.checkpointing, plan.table()
    family = family_memory(tiger_cfg)
    batch = family.batch_bound(plan.schedule.max_tokens_per_rank)
    measured = measure_tiger_step(tiger_cfg.model, CODEBOOKS, batch.num_tokens, batch.max_len)
    assert measured.total <= budget - MARGIN_FIXED_BYTES
    # The plan's sum (plus the token table and its lookup, which this one-process measurement does not
    # hold) covers the measured step, and its per-step terms predict the step's activations.
    assert measured.total <= plan.memory.total, (measured, plan.memory.total)
    terms = family.step_terms(batch, num_items=5000, dtype_bytes=4, checkpointing=False, has_timestamps=True,
                              device_type="cpu")  # fmt: skip
    assert plan.memory.terms["activations"] == terms["activations"]
    predicted = terms["activations"] + terms["attention"] + terms["loss"]
    assert abs(predicted - measured.activations) / measured.activations < 0.05, (predicted, measured)
