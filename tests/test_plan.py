"""The planner (cluster/plan.py), its CLI and the schedule=auto hooks (cluster/schedule.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from cluster.__main__ import main
from cluster.memory import BatchShape, GiB, MiB, estimate_memory, model_dims
from cluster.plan import ClusterSpec, candidates, plan_schedule
from cluster.schedule import apply_plan, check_predicted_peak, write_plan
from train.config import load_train_config

BIG = ["model.embedding_dim=256", "model.max_seq_len=1024", "model.num_blocks=8", "model.num_heads=4",
       "model.attention_dim=64", "model.linear_dim=64", "loss.negatives=shared", "loss.num_negatives=2048",
       "data.batch_size=1024", "embeddings.optimizer=adam"]  # fmt: skip


@pytest.mark.parametrize("gpu_gib", [24, 40, 80])
@pytest.mark.parametrize("nodes", [1, 4])
@pytest.mark.parametrize("num_items", [10**6, 2 * 10**8])
def test_plan_never_exceeds_the_budget(gpu_gib, nodes, num_items):
    cfg = load_train_config("configs/hstu_ml1m.yaml", BIG)
    cluster = ClusterSpec(gpu_gib * GiB, 8, nodes)
    plan = plan_schedule(cfg, cluster, num_items=num_items, mean_row_len=300.0, explain=False)
    if plan.fits:
        assert plan.memory.with_margin <= cluster.gpu_memory_bytes
        assert plan.headroom_bytes >= 0
        # Re-estimating the config with the plan's overrides applied gives the same prediction.
        applied = load_train_config("configs/hstu_ml1m.yaml", BIG + plan.overrides)
        s = plan.schedule
        batch = BatchShape.bound(s.max_tokens_per_rank, 1024, "hstu", s.max_attention_cost_per_rank)
        again = estimate_memory(applied, world_size=8 * nodes, local_world_size=8, num_items=num_items,
                                batch=batch, checkpointing=s.checkpointing, has_timestamps=True)  # fmt: skip
        assert again.terms == plan.memory.terms
        # The configured global batch is kept (token budgets round up by < 1 token per rank and step).
        assert plan.tokens_per_step >= 1024 * 299
    else:
        assert plan.memory.with_margin > cluster.gpu_memory_bytes


def test_a_200m_item_adam_table_needs_more_ranks_and_says_so():
    cfg = load_train_config("configs/hstu_ml1m.yaml", BIG)
    plan = plan_schedule(cfg, ClusterSpec(24 * GiB, 8, 1), num_items=2 * 10**8, mean_row_len=300.0)
    assert not plan.fits
    assert "largest term is embedding_optimizer" in plan.explain
    assert "What fits: " in plan.explain and "nodes" in plan.explain
    # and that suggestion really fits
    nodes = int(plan.explain.split("What fits: ")[1].split(" nodes")[0])
    bigger = plan_schedule(cfg, ClusterSpec(24 * GiB, 8, nodes), num_items=2 * 10**8, mean_row_len=300.0)
    assert bigger.fits


def test_ample_memory_picks_no_offload_and_less_memory_picks_more_savings():
    cfg = load_train_config("configs/hstu_ml1m.yaml", BIG)
    roomy = plan_schedule(cfg, ClusterSpec(80 * GiB, 8, 1), num_items=10**6, mean_row_len=300.0)
    assert roomy.fits and not roomy.schedule.offload_optimizer and not roomy.schedule.offload_params
    tight_bytes = int(roomy.memory.with_margin * 0.6)
    tight = plan_schedule(cfg, ClusterSpec(tight_bytes, 8, 1), num_items=10**6, mean_row_len=300.0)
    assert tight.fits and tight.memory.with_margin <= tight_bytes < roomy.memory.with_margin
    assert tight.step_seconds >= roomy.step_seconds


def test_cli_writes_json_and_reports_misses(tmp_path, capsys):
    out = tmp_path / "plan.json"
    code = main(["plan", "--config", "configs/hstu_ml1m.yaml", "--gpu-memory", "40GiB", "--gpus-per-node", "8",
                 "--nodes", "2", "--num-items", "3706", "--json", str(out), "loss.negatives=shared"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    for word in ("embedding_optimizer", "activations", "attention", "headroom", "overrides:"):
        assert word in text
    plan = json.loads(out.read_text())
    assert plan["fits"] and plan["predicted_peak_bytes"] <= 40 * GiB
    assert "data.batching=tokens" in plan["overrides"]
    code = main(["plan", "--config", "configs/hstu_ml1m.yaml", "--gpu-memory", "1GiB", "--num-items", "3706"])
    assert code == 2
    assert "No schedule fits" in capsys.readouterr().out
    assert (
        main(["plan", "--config", "configs/hstu_ml1m.yaml", "--gpu-memory", "lots", "--num-items", "1"]) == 1
    )


def test_apply_plan_and_peak_check(tmp_path):
    cfg = load_train_config("configs/hstu_ml1m.yaml", ["loss.negatives=shared"])
    new_cfg, plan = apply_plan(cfg, ClusterSpec(40 * GiB, 8, 1), num_items=3706)
    assert new_cfg.data.batching == "tokens" and new_cfg.zero.stage == plan.schedule.zero_stage
    assert new_cfg.data.max_tokens_per_rank == plan.schedule.max_tokens_per_rank
    assert cfg.data.batching == "rows"  # the input is not modified
    assert json.loads(write_plan(plan, tmp_path).read_text())["fits"]
    assert check_predicted_peak(plan, plan.memory.total) is None
    assert "off the plan" in check_predicted_peak(plan, 2 * plan.memory.total)
    assert "leaves less than the margin" in check_predicted_peak(plan, plan.gpu_memory_bytes)
    with pytest.raises(ValueError, match="No schedule fits"):
        apply_plan(cfg, ClusterSpec(1 * GiB, 8, 1), num_items=3706)


def test_a_plan_for_a_small_budget_trains_within_it():
    """Plan for a simulated small GPU, then run the real HSTU forward/backward/AdamW step on the worst
    batch the plan admits (rows of max_seq_len up to the token budget) under MemTracker."""
    from cluster.memory import MARGIN_FIXED_BYTES
    from cluster.memory_measure import measure_dense_step

    overrides = ["model.embedding_dim=64", "model.max_seq_len=128", "model.num_blocks=4", "model.num_heads=2",
                 "model.attention_dim=32", "model.linear_dim=32", "model.dropout=0.0", "loss.negatives=shared",
                 "loss.num_negatives=256", "data.batch_size=256", "embeddings.sharding_type=row_wise"]  # fmt: skip
    cfg = load_train_config("configs/hstu_ml1m.yaml", overrides)
    # 1 GiB stands for the CUDA context (the fixed margin); 48 MiB of real room.
    budget = MARGIN_FIXED_BYTES + 48 * MiB
    cluster = dataclasses.replace(ClusterSpec(budget, 1, 1), precision="fp32")
    plan = plan_schedule(cfg, cluster, num_items=2000, mean_row_len=129.0)
    assert plan.fits and plan.schedule.grad_accum_steps > 1, plan.table()
    tokens = plan.schedule.max_tokens_per_rank
    lengths = [128] * (tokens // 129) + ([tokens % 129] if tokens % 129 else [])
    dims = model_dims(cfg)
    measured = measure_dense_step(dims, lengths, negatives="shared", num_negatives=256, num_items=2000,
                                  checkpointing=plan.schedule.checkpointing)  # fmt: skip
    assert measured.total <= budget - MARGIN_FIXED_BYTES
    # The prediction bounds it from above and not by much (the table terms are not in this
    # one-process measurement, and the plan assumes the worst batch shape its budgets admit).
    table = sum(plan.memory.terms[k] for k in ("embedding_weights", "embedding_optimizer", "embedding_grads"))
    predicted = plan.memory.total - table
    assert measured.total <= predicted < 1.6 * measured.total, (predicted, measured)


@pytest.mark.distributed
def test_schedule_auto_plans_and_trains(synthetic_data, tmp_path):
    """schedule.mode=auto on a small simulated GPU: the trainer applies the plan's overrides (token
    batching, ZeRO stage, sharding), writes plan.json, and trains to the end with them."""
    from tests.conftest import TINY_MODEL, run_train

    out = tmp_path / "auto"
    run_train([f"data.dir={synthetic_data}", *TINY_MODEL, "run.epochs=1", "schedule.mode=auto",
               "schedule.gpu_memory_gib=2"], out, nproc=2)  # fmt: skip
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"]
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    for override in plan["overrides"]:
        key, value = override.split("=", 1)
        section, name = key.split(".")
        assert str(resolved[section][name]).lower() == value.lower() or float(
            resolved[section][name]
        ) == float(value), key
    assert resolved["data"]["batching"] == "tokens"
    assert json.loads((out / "final_metrics.json").read_text())["test"]["num_users"] > 0


@pytest.mark.parametrize("config", ["configs/gru4rec_ml1m.yaml", "configs/bert4rec_ml1m.yaml"])
def test_gru4rec_and_bert4rec_are_plannable(config):
    """GRU4Rec and BERT4Rec have memory models (before, ``plan`` raised "model_dims covers the
    retrieval encoders (hstu, sasrec)" for both): a fitting schedule, without activation
    checkpointing when memory is ample, whose terms re-estimate from the applied overrides.
    GRU4Rec is never offered checkpointing; BERT4Rec is (``checkpoint_layers`` wraps its blocks)."""
    from cluster.memory import family_memory

    cfg = load_train_config(config)
    cluster = ClusterSpec(24 * GiB, 8, 1)
    plan = plan_schedule(cfg, cluster, num_items=3706, mean_row_len=165.0)
    assert plan.fits and plan.memory.with_margin <= cluster.gpu_memory_bytes, plan.table()
    assert not plan.schedule.checkpointing  # it would only cost time
    offered = {ckpt for *_, ckpt in candidates(cfg)}
    assert offered == ({False, True} if cfg.model.name == "bert4rec" else {False})
    applied = load_train_config(config, plan.overrides)
    s = plan.schedule
    family = family_memory(applied)
    batch = family.batch_bound(s.max_tokens_per_rank, s.max_attention_cost_per_rank)
    again = estimate_memory(applied, world_size=8, local_world_size=8, num_items=3706, batch=batch,
                            has_timestamps=True, family=family)  # fmt: skip
    assert again.terms == plan.memory.terms
    # A tight GPU makes the planner shrink the micro-batch (gradient accumulation) or, for BERT4Rec,
    # checkpoint its blocks, still fitting.
    tight_bytes = int(plan.memory.with_margin - 0.5 * plan.memory.terms["loss"])
    tight = plan_schedule(cfg, ClusterSpec(tight_bytes, 8, 1), num_items=3706, mean_row_len=165.0)
    assert tight.fits and tight.memory.with_margin <= tight_bytes
    if cfg.model.name == "gru4rec":
        assert tight.schedule.grad_accum_steps > 1 and not tight.schedule.checkpointing
        return
    assert tight.schedule.checkpointing or tight.schedule.grad_accum_steps > 1
    # BERT4Rec: between the checkpointed and the plain estimate of the same micro-batch, the planner
    # checkpoints rather than halving the micro-batch (4/3 of the compute instead of twice the steps).
    ckpt = estimate_memory(applied, world_size=8, local_world_size=8, num_items=3706, batch=batch,
                           has_timestamps=True, family=family, checkpointing=True)  # fmt: skip
    assert ckpt.with_margin < plan.memory.with_margin
    between = (ckpt.with_margin + plan.memory.with_margin) // 2
    squeezed = plan_schedule(cfg, ClusterSpec(between, 8, 1), num_items=3706, mean_row_len=165.0)
    assert squeezed.fits and squeezed.memory.with_margin <= between, squeezed.table()
    assert squeezed.schedule.checkpointing and squeezed.schedule.grad_accum_steps == 1
    assert "schedule.activation_checkpointing=true" in squeezed.overrides
    assert "recompute" in squeezed.memory.terms
