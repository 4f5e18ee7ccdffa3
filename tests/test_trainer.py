"""The trainer end to end on 2 CPU processes (gloo): real TorchRec sharding, real DeepSpeed engines.

Each comparison holds the data, the seed and the global batch fixed and changes one thing that must
not change the maths: how the table is sharded, the ZeRO stage, an interruption.
"""

from __future__ import annotations

import csv
import json
import math
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from tests.conftest import TINY_MODEL, assert_logged_model_reproduces_predictions, run_train
from train.config import load_train_config

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Same global batches in every layout: rows are dealt to ranks round-robin within each global batch.
EXACT = ["data.partition=strided", "run.epochs=2"]


def assert_same_losses(a: dict[int, float], b: dict[int, float], rtol: float = 2e-4) -> None:
    assert a.keys() == b.keys() and len(a) >= 10, (sorted(a), sorted(b))
    steps = sorted(a)
    np.testing.assert_allclose([a[s] for s in steps], [b[s] for s in steps], rtol=rtol, atol=1e-5)


# The sharded-vs-single runs also cover two README claims at no extra cost: a table width that is not a
# multiple of 4 (the ML-1M configs' d=50; fbgemm stores 52 columns, the model sees 50) and the linear
# decay with a constant table LR. Element-wise Adagrad: row-wise Adagrad keeps one accumulator per row
# *per column shard*, so under column_wise sharding it is a (slightly) different optimizer by construction.
ODD_WIDTH, STORED_WIDTH = 50, 52
SCHEDULE = dict(warmup=3, decay="linear", decay_fraction=0.5, floor=0.2)
SHARDED_EXACT = [
    *EXACT,
    "embeddings.optimizer=adagrad",
    f"optim.warmup_steps={SCHEDULE['warmup']}",
    f"optim.decay={SCHEDULE['decay']}",
    f"optim.decay_fraction={SCHEDULE['decay_fraction']}",
    f"optim.min_lr_ratio={SCHEDULE['floor']}",
    "embeddings.schedule=constant",
]


# The model-family overrides of the runs above: HSTU, GRU4Rec and BERT4Rec (2 heads of 25) at the odd
# width; TIGER's width is d_model (32). GRU4Rec's table takes SGD: its update is proportional to the
# gradient, so a table gradient off by a constant factor on 2 ranks fails the comparison (it did, by
# 1/world_size, before ShardedItemTable.grad_sum_over_ranks read TorchRec's gradient division); Adagrad
# and Adam divide such a factor out.
WIDTH = {
    "hstu": [f"model.embedding_dim={ODD_WIDTH}"],
    "gru4rec": [f"model.embedding_dim={ODD_WIDTH}", "embeddings.optimizer=sgd"],
    # input_window: the logged model can exclude only the history it is given (its logged-model test).
    "bert4rec": [f"model.embedding_dim={ODD_WIDTH}", "eval.exclude=input_window"],
    "tiger": [],
}


def sharded_run(train_runs, sharding: str, family: str = "hstu"):
    """The 2-process run of ``SHARDED_EXACT`` with the table sharded as ``sharding`` (cached)."""
    # 4-column shards: 13 of them over the 2 ranks, the last one holding 2 real and 2 padding columns.
    extra = ["embeddings.min_partition=4"] if sharding == "column_wise" else []
    if family == "bert4rec":  # MLflow on (beside the run: <train_runs>/mlflow.db) for its logged model
        extra += ["tracking.enabled=true", "tracking.system_metrics=false"]
    args = [*SHARDED_EXACT, *WIDTH[family], f"embeddings.sharding_type={sharding}", *extra]
    return train_runs(args, nproc=2, family=family)


def single_run(train_runs, family: str = "hstu"):
    """The 1-process run of ``SHARDED_EXACT`` the sharded runs are compared with (cached)."""
    return train_runs(
        [*SHARDED_EXACT, *WIDTH[family], "embeddings.sharding_type=table_wise"], nproc=1, family=family
    )


def test_bert4rec_logged_model_ranks_as_its_test_predictions(train_runs, synthetic_data):
    """BERT4Rec's MLflow logged model (train/serving.py: the mask appended after the history), from the
    2-process row-wise run, loaded back by its model id, recommends what the trainer wrote to
    test_predictions.parquet; the table was gathered to rank 0 only."""
    from mlflow import MlflowClient

    run = sharded_run(train_runs, "row_wise", "bert4rec")
    client = MlflowClient(f"sqlite:///{run.output_dir.parent / 'mlflow.db'}")
    mlflow_run = client.get_run((run.output_dir / "mlflow_run_id").read_text().strip())
    assert mlflow_run.info.status == "FINISHED"
    assert_logged_model_reproduces_predictions(mlflow_run, run.output_dir, synthetic_data)


# table_row_wise is not here: TorchRec's EmbeddingCollection sharder does not offer it (see
# tests/test_embeddings.py::test_table_row_wise_is_refused_naming_the_key). TIGER, GRU4Rec and BERT4Rec go
# through the same test via the task interface, on the sharding that splits their table over both ranks.
@pytest.mark.parametrize(
    ("family", "sharding"),
    [("hstu", "row_wise"), ("hstu", "table_wise"), ("hstu", "column_wise"), ("hstu", "data_parallel"),
     ("tiger", "row_wise"), ("gru4rec", "row_wise"), ("bert4rec", "row_wise")],
)  # fmt: skip
def test_sharded_equals_single_process(train_runs, family, sharding):
    single = single_run(train_runs, family)
    sharded = sharded_run(train_runs, sharding, family)
    plan = (sharded.output_dir / "sharding_plan.txt").read_text()
    assert sharding in plan
    if sharding in ("row_wise", "column_wise"):  # these really split the table over both ranks
        assert "rank:0" in plan and "rank:1" in plan, plan
    assert_same_losses(single.losses, sharded.losses)
    # Every metric to 1e-6, as the other eval comparisons. Measured on this fixture: losses within
    # 6e-7 relative, metrics within 2e-16, the same in every session (the runs are deterministic).
    # A metric counts users (1/400 each), so a failure here is a user whose target moved across a
    # rank cut-off: a real difference, or a near-tie of two scores within the float noise.
    # TIGER ranks by beam search, whose pruning turns a float-noise difference of two beams' scores
    # into a different list: measured, 1 of the 400 users' hr@5 moved (0.3075 vs 0.3100). Two users
    # of slack (0.005) there; a systematic difference would move many.
    tol = 2 / 400 + 1e-9 if family == "tiger" else 1e-6
    for split in ("valid", "test"):
        for key, value in single.final[split].items():
            assert sharded.final[split][key] == pytest.approx(value, abs=tol), (split, key)


def stored_table(checkpoint, tmp_path) -> torch.Tensor:
    """The whole stored item table ``[rows, stored width]`` of a checkpoint, read back without our code."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = tmp_path / f"{checkpoint.parent.parent.name}_{checkpoint.name}.pt"
    dcp_to_torch_save(checkpoint / "sparse", path)
    state = torch.load(path, weights_only=False)
    return state["item_table"]["model"]["embeddings.item_table.weight"]  # tables are saved by name


@pytest.mark.parametrize("sharding", ["row_wise", "column_wise"])
def test_odd_width_is_stored_padded_and_the_padding_gets_no_update(
    train_runs, synthetic_data, sharding, tmp_path
):
    """d=50: the dense model is built 50 wide, the table is stored 52 wide, and the 2 padding columns
    keep their values through training (no gradient reaches them) while the 50 real ones move."""
    num_rows = json.loads((synthetic_data / "manifest.json").read_text())["num_items"] + 1
    runs = {"single": single_run(train_runs), sharding: sharded_run(train_runs, sharding)}
    last = {}
    for name, run in runs.items():
        ckpts = sorted((run.output_dir / "checkpoints").glob("step_*"))
        assert len(ckpts) >= 2, ckpts
        first, last[name] = (stored_table(c, tmp_path) for c in (ckpts[0], ckpts[-1]))
        assert first.shape == last[name].shape == (num_rows, STORED_WIDTH)
        assert torch.equal(first[:, ODD_WIDTH:], last[name][:, ODD_WIDTH:]), name
        assert (first[:, :ODD_WIDTH] - last[name][:, :ODD_WIDTH]).abs().max() > 1e-2, name
        dense = torch.load(ckpts[-1] / "dense" / "dense" / "mp_rank_00_model_states.pt", weights_only=False)
        assert dense["module"]["pos_emb.weight"].shape == (20, ODD_WIDTH)
    # The same table after training, sharded or not (measured: at most 1.7e-5 apart, values ~0.05).
    torch.testing.assert_close(last[sharding], last["single"], rtol=1e-3, atol=1e-4)


def test_linear_decay_and_constant_table_lr(train_runs):
    """optim.decay=linear and embeddings.schedule=constant: the logged LRs step by step against the formula."""
    run = single_run(train_runs)
    assert_lr_follows_the_schedule(run.output_dir / "metrics.jsonl", **SCHEDULE, table_schedule="constant")


def test_data_parallel_adam_table_resumes_exactly(train_runs, synthetic_data, tmp_path):
    """A replicated table with a plain torch Adam (the reference's table optimizer, CPU included):
    stopped mid-epoch and resumed, it follows the uninterrupted run, so Adam's moments were saved."""
    args = [
        *EXACT,
        "embeddings.sharding_type=data_parallel",
        "embeddings.optimizer=adam",
        "embeddings.lr=0.001",
    ]
    full = train_runs(args, nproc=2)
    assert "data_parallel" in (full.output_dir / "sharding_plan.txt").read_text()
    out = tmp_path / "resumed"
    common = [f"data.dir={synthetic_data}", *TINY_MODEL, *args]
    stop = max(full.losses) // 2 + 3  # mid-epoch
    run_train([*common, f"run.max_steps={stop}"], out, nproc=2)
    run_train(common, out, nproc=2)
    resumed = json.loads((out / "final_metrics.json").read_text())
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            losses[rec["step"]] = rec["train/loss"]
    assert_same_losses(full.losses, losses, rtol=1e-6)
    assert resumed["test"] == full.final["test"]


@pytest.mark.parametrize(("family", "stages"), [("hstu", (1, 2, 3)), ("tiger", (3,))])
def test_zero_stages_give_the_same_trajectory(train_runs, family, stages):
    base = train_runs([*EXACT, "zero.stage=0"], nproc=2, family=family)
    for stage in stages:
        other = train_runs([*EXACT, f"zero.stage={stage}"], nproc=2, family=family)
        assert_same_losses(base.losses, other.losses)
        # The test model is the best-valid checkpoint, reloaded (also under ZeRO-3's partitioned
        # weights): its valid metrics are the ones recorded when it was the current model.
        final = other.final
        records = [json.loads(line) for line in (other.output_dir / "metrics.jsonl").read_text().splitlines()]
        at_best = next(r for r in records if r["step"] == final["best_step"] and "valid/mrr" in r)
        assert final["valid"]["mrr"] == pytest.approx(at_best["valid/mrr"], abs=1e-6), stage


def test_bf16_tracks_the_fp32_trajectory(train_runs):
    """zero.precision=bf16 (DeepSpeed's bf16 engine, which runs on CPU too): the dense model computes
    in bf16 and keeps fp32 master weights, and the loss curve stays within one bf16 rounding step of
    the fp32 run's.

    Tolerance: bf16 keeps 8 significant bits, so neighbouring bf16 values are 2^-8 (0.39%) apart
    relative: a curve within 2^-8 of fp32 at every step differs by less than one bf16 rounding of the
    loss. The loss itself is computed in fp32 from the bf16 encoder outputs and averaged over ~400
    positions per step, so the rounding errors partly cancel (measured over the 26 steps: at most
    4.9e-4 relative, 1.6e-4 on average).
    """
    fp32 = train_runs([*EXACT, "zero.stage=2"], nproc=2)
    bf16 = train_runs([*EXACT, "zero.stage=2", "zero.precision=bf16"], nproc=2)
    assert json.loads((bf16.output_dir / "deepspeed_config.json").read_text())["bf16"]["enabled"] is True
    ckpt = sorted((bf16.output_dir / "checkpoints").glob("step_*"))[-1]
    dense = torch.load(ckpt / "dense" / "dense" / "mp_rank_00_model_states.pt", weights_only=False)
    assert {v.dtype for v in dense["module"].values()} == {torch.bfloat16}
    assert_same_losses(fp32.losses, bf16.losses, rtol=2**-8)
    # ... and bf16 arithmetic really ran: identical fp32 runs agree bit for bit, these do not.
    steps = sorted(fp32.losses)
    assert max(abs(bf16.losses[s] / fp32.losses[s] - 1) for s in steps) > 1e-5


@pytest.mark.parametrize("family", ["hstu", "tiger", "gru4rec", "bert4rec"])
def test_killed_and_resumed_equals_uninterrupted(train_runs, family_args, family, tmp_path):
    # Warmup, a flat stretch, then cosine decay over the second half: the run resumes at step 5 (flat)
    # and must continue the schedule into the decay, on the table too.
    schedule = [
        "optim.warmup_steps=4",
        "optim.decay=cosine",
        "optim.decay_fraction=0.5",
        "optim.min_lr_ratio=0.1",
    ]
    args = [*EXACT, "zero.stage=2", "run.checkpoint_every_steps=5", *schedule]
    full = train_runs(args, nproc=2, family=family)
    assert_lr_follows_the_schedule(full.output_dir / "metrics.jsonl", warmup=4, decay_fraction=0.5, floor=0.1)
    total = max(full.losses)
    out = tmp_path / "resumed"
    common = [*family_args(family), *args]
    # Stop after step 7, then make it look like a crash during the step-7 save: the complete step-7
    # checkpoint is replaced by a half-written temporary directory. Resume must use step 5.
    run_train([*common, "run.max_steps=7"], out, nproc=2)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts[-2:] == ["step_00000005", "step_00000007"], ckpts
    shutil.rmtree(out / "checkpoints" / "step_00000007")
    half = out / "checkpoints" / ".tmp_step_00000007"
    (half / "sparse").mkdir(parents=True)
    (half / "sparse" / "__0_0.distcp").write_bytes(b"partial")
    run_train(common, out, nproc=2)
    resumed = {s: v for s, v in json_losses(out).items()}
    assert max(resumed) == total
    assert_same_losses(full.losses, resumed, rtol=1e-6)
    final = json.loads((out / "final_metrics.json").read_text())
    for split in ("valid", "test"):
        for k, v in full.final[split].items():
            assert final[split][k] == pytest.approx(v, abs=1e-6), (split, k)
    assert_lr_follows_the_schedule(out / "metrics.jsonl", warmup=4, decay_fraction=0.5, floor=0.1)


def assert_lr_follows_the_schedule(metrics_file, warmup: int, decay_fraction: float, floor: float,
                                   decay: str = "cosine", table_schedule: str = "dense") -> None:  # fmt: skip
    """Logged LRs: linear warmup, flat, then a cosine (or linear) decay to ``floor``; the table's LR
    scaled by the same factor (``table_schedule="dense"``) or fixed (``"constant"``)."""
    records = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    records = {r["step"]: r for r in records if "train/lr" in r}  # a resumed run re-logs some steps
    total = max(records)
    decay_start = total - decay_fraction * (total - warmup)
    assert 5 < decay_start < total - 2, "the test wants a resume in the flat stretch and a few decay steps"
    for step, rec in records.items():
        # The LR logged after `step` updates is the one the next update uses.
        if step < warmup:
            want = (step + 1) / warmup
        elif step <= decay_start:
            want = 1.0
        else:
            progress = (step - decay_start) / (total - decay_start)
            if decay == "cosine":
                want = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
            else:
                want = floor + (1 - floor) * (1 - progress)
        assert rec["train/lr"] == pytest.approx(1e-3 * want, rel=1e-6), step
        table_want = want if table_schedule == "dense" else 1.0
        assert rec["train/table_lr"] == pytest.approx(0.05 * table_want, rel=1e-6), step
    assert records[total]["train/lr"] == pytest.approx(1e-3 * floor)


def json_losses(out) -> dict[int, float]:
    losses = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            losses[rec["step"]] = rec["train/loss"]
    return losses


def test_outputs_and_predictions_are_consistent(train_runs, synthetic_data):
    run = train_runs([*EXACT, "zero.stage=2"], nproc=2)
    final = run.final
    assert set(final) >= {"test", "valid"}
    for key in ("hr@1", "hr@10", "hr@50", "hr@200", "ndcg@10", "ndcg@50", "ndcg@200", "mrr"):
        assert 0.0 <= final["test"][key] <= 1.0
    preds = pq.read_table(run.output_dir / "test_predictions.parquet").to_pylist()
    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    assert len(preds) == manifest["splits"]["test"]["num_rows"] == final["test"]["num_users"]
    # Each user's target, straight from the raw log the fixture generated (the last interaction by
    # time, ties in file order; every user has >= 3, min_seq_len), so a wrong target written by the
    # data job or the trainer cannot cancel out in the recomputed HR@10 below.
    (log,) = [i["path"] for i in manifest["inputs"]]
    with open(log, newline="") as f:
        rows = sorted(
            enumerate(csv.DictReader(f)), key=lambda r: (r[1]["user"], int(r[1]["timestamp"]), r[0])
        )
    raw_targets = {row["user"]: row["item"] for _, row in rows}  # the last one per user wins
    assert {p["user_id"]: p["target_item_id"] for p in preds} == raw_targets
    # Recompute HR@10 from the raw ids alone, without our code.
    hits10 = np.mean([raw_targets[p["user_id"]] in p["top_item_ids"][:10] for p in preds])
    assert hits10 == pytest.approx(final["test"]["hr@10"], abs=1e-9)
    assert all(len(p["top_item_ids"]) == min(200, manifest["num_items"]) for p in preds)
    # The user's own history never appears in their recommendations.
    test_rows = pq.read_table(synthetic_data / "test").to_pylist()
    vocab = {
        r["dense_id"]: r["raw_id"]
        for r in pq.read_table(synthetic_data / "vocab" / "items.parquet").to_pylist()
    }
    users = {
        r["dense_id"]: r["raw_id"]
        for r in pq.read_table(synthetic_data / "vocab" / "users.parquet").to_pylist()
    }
    by_user = {p["user_id"]: p for p in preds}
    for row in test_rows[:50]:
        history = {vocab[i] for i in row["item_ids"][-21:-1]}
        pred = by_user[users[row["user_id"]]]
        assert pred["target_item_id"] == vocab[row["item_ids"][-1]]
        assert not (set(pred["top_item_ids"]) & (history - {pred["target_item_id"]}))


def test_binary_loss_run_reports_its_loss_and_its_size(train_runs, synthetic_data):
    """SASRec's binary loss (one negative per position) through the real trainer, and the parameter
    counts every run records, against a count of a freshly built encoder and the table's shape."""
    from train.models import build_encoder

    binary = ["loss.function=binary", "loss.negatives=per_position", "loss.num_negatives=1", "run.epochs=3"]
    run = train_runs(binary, nproc=1)
    final = run.final
    assert final["loss"] == {"function": "binary", "negatives": "per_position", "num_negatives": 1}
    assert "loss=binary per_position(1)" in run.proc.stderr
    losses = run.losses
    steps = sorted(losses)
    third = len(steps) // 3
    assert all(math.isfinite(v) for v in losses.values())
    first, last = (np.mean([losses[s] for s in part]) for part in (steps[:third], steps[-third:]))
    assert last < first - 0.05, (first, last)  # it trains
    cfg = load_train_config(None, [*TINY_MODEL, *binary])
    dense = sum(p.numel() for p in build_encoder(cfg.model).parameters())
    num_items = json.loads((synthetic_data / "manifest.json").read_text())["num_items"]
    tables = (num_items + 1) * cfg.model.embedding_dim  # row 0 is padding
    assert final["params"] == {"dense": dense, "tables": tables, "total": dense + tables}
    assert f"{dense} dense + {tables} table params" in run.proc.stderr


def test_mlflow_run_has_params_metrics_and_artifacts(synthetic_data, tmp_path):
    from mlflow import MlflowClient

    from train.tracking import metric_key

    out = tmp_path / "tracked"
    db = tmp_path / "mlflow.db"
    args = [f"data.dir={synthetic_data}", *TINY_MODEL, "run.epochs=1", "tracking.enabled=true",
            f"tracking.tracking_uri=sqlite:///{db}", "tracking.experiment=test", "tracking.system_metrics=false"]  # fmt: skip
    run_train(args, out, nproc=2)
    client = MlflowClient(f"sqlite:///{db}")
    exp = client.get_experiment_by_name("test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "hstu"
    assert run.data.params["embeddings.sharding_type"] == "row_wise"
    assert run.data.tags["world_size"] == "2"
    assert "train/loss" in run.data.metrics
    assert any(k.startswith("test/hr") for k in run.data.metrics)
    assert any(k.startswith("valid/ndcg") for k in run.data.metrics)
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == max(json_losses(out))
    # The values, step by step, are the ones in metrics.jsonl; the test metrics those of final_metrics.json.
    assert {m.step: m.value for m in history} == json_losses(out)
    final = json.loads((out / "final_metrics.json").read_text())
    assert {k: run.data.params[f"params.{k}"] for k in ("dense", "tables", "total")} == {
        k: str(v) for k, v in final["params"].items()
    }
    assert final["params"]["total"] == final["params"]["dense"] + final["params"]["tables"] > 0
    for key, value in final["test"].items():
        assert run.data.metrics[metric_key(f"test/{key}")] == pytest.approx(value, rel=1e-12), key
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "deepspeed_config.json", "sharding_plan.txt", "final_metrics.json"} <= names, names
    pngs = [a.path for a in client.list_artifacts(run.info.run_id, "plots") if a.path.endswith(".png")]
    assert pngs, names


def test_train_valid_protocol_trains_on_valid_rows_and_tests_the_last_model(synthetic_data, tmp_path):
    """The reference protocol: train on every item but the test target, exact softmax, no selection."""
    out = tmp_path / "train_valid"
    args = [f"data.dir={synthetic_data}", *TINY_MODEL, "data.train_split=train_valid", "loss.negatives=full",
            "run.epochs=2", "eval.every_epochs=1"]  # fmt: skip
    proc = run_train(args, out, nproc=2)
    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    valid = manifest["splits"]["valid"]
    assert f"{valid['num_rows']} rows, {valid['num_interactions']} items of the valid split" in proc.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("valid/") for r in records for k in r)  # nothing held out to select on
    curve = [r for r in records if "test/hr@10" in r]
    assert len(curve) == 2
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["train_split"] == "train_valid" and final["best_step"] == -1
    elapsed = [r["elapsed_s"] for r in records]
    assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= final["elapsed_s"]
    # The last model is tested: the final test equals the last point of the curve.
    for key, value in final["test"].items():
        assert curve[-1][f"test/{key}"] == pytest.approx(value, abs=1e-9), key
    assert final["test"]["hr@10"] > final["popularity_test"]["hr@10"]  # it learned something
    # Early stopping needs a held-out split: refused with the key named.
    bad = run_train([*args, "eval.patience=3"], tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "eval.patience" in bad.stderr and "train_valid" in bad.stderr


def test_older_windows_train_on_the_cut_history_too(synthetic_data, tmp_path):
    """data.older_windows=true: an epoch reads the train rows and the older split's windows."""
    manifest = json.loads((synthetic_data / "manifest.json").read_text())
    train, older = manifest["splits"]["train"], manifest["splits"]["older"]
    assert older["num_rows"] > 0, "the fixture has users longer than max_seq_len"
    args = [f"data.dir={synthetic_data}", *TINY_MODEL, "data.older_windows=true", "run.epochs=1"]
    proc = run_train(args, tmp_path / "older")
    rows, items = train["num_rows"] + older["num_rows"], train["num_interactions"] + older["num_interactions"]
    assert f"{rows} rows, {items} items of the train+older split" in proc.stderr
    assert json.loads((tmp_path / "older" / "final_metrics.json").read_text())["older_windows"] is True
    # A data directory prepared without the split: one clear message naming the fix.
    bare = tmp_path / "bare"
    bare.mkdir()
    for entry in synthetic_data.iterdir():
        (bare / entry.name).symlink_to(entry)
    (bare / "manifest.json").unlink()
    del manifest["splits"]["older"]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    missing = run_train([*args, f"data.dir={bare}"], tmp_path / "missing", check=False)
    assert missing.returncode == 2 and "split.older_windows=true" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_user_errors_are_one_clear_line(synthetic_data, tmp_path):
    bad_key = run_train(["model.num_blockz=2"], tmp_path / "a", check=False)
    assert (
        bad_key.returncode == 2 and "model.num_blockz" in bad_key.stderr and "Traceback" not in bad_key.stderr
    )
    missing = run_train([f"data.dir={tmp_path}/nowhere", *TINY_MODEL], tmp_path / "b", check=False)
    assert missing.returncode == 2 and "nowhere" in missing.stderr and "prepare" in missing.stderr


def test_checkpoint_of_another_model_is_refused(train_runs, synthetic_data, tmp_path):
    run = train_runs([*EXACT, "zero.stage=2"], nproc=2)
    other = [f"data.dir={synthetic_data}", *TINY_MODEL, "model.embedding_dim=16"]
    ckpt = sorted((run.output_dir / "checkpoints").iterdir())[-1]
    proc = run_train([*other, f"run.resume={ckpt}"], tmp_path / "c", check=False)
    assert proc.returncode == 2 and "another model" in proc.stderr and "embedding_dim" in proc.stderr


@pytest.mark.shared_data
def test_ml100k_beats_popularity_by_a_wide_margin(tmp_path):
    """A short real run: ML-100K through the Ray job, HSTU on 2 processes (about 1-2 minutes)."""
    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare
    from tests.conftest import ROOT, shared_data_dir

    src = shared_data_dir("ml-100k")
    cfg = load_config(PrepareConfig, ROOT / "configs/data/ml100k.yaml",
                      [f"input.paths=[{src / 'u.data'}]", f"input.item_metadata={src / 'u.item'}",
                       f"output.dir={tmp_path / 'data'}", "ray.num_cpus=2"])  # fmt: skip
    prepare(cfg)
    out = tmp_path / "run"
    run_train(["--config", "configs/hstu_ml100k.yaml", f"data.dir={tmp_path / 'data'}", "run.epochs=20",
               "eval.every_epochs=10", "tracking.enabled=false", "run.progress_bar=off"], out, nproc=2)  # fmt: skip
    final = json.loads((out / "final_metrics.json").read_text())
    popularity = final["popularity_test"]["hr@10"]
    # Popularity with history excluded is HR@10 ~0.07-0.09 on this set; the model must be far above it.
    assert 0.05 < popularity < 0.1
    assert final["test"]["hr@10"] > 2 * popularity, (final["test"], popularity)
    assert final["test"]["ndcg@10"] > 2 * final["popularity_test"]["ndcg@10"]


def test_checkpoint_resumes_on_another_world_size(train_runs, synthetic_data, tmp_path):
    """A 2-process checkpoint loads in 1 process: DCP reshards the table, and eval gives the same numbers."""
    args = [*EXACT, "zero.stage=2"]
    run = train_runs(args, nproc=2)
    ckpt = run.output_dir / "checkpoints" / f"step_{run.final['best_step']:08d}"
    epoch = torch.load(ckpt / "trainer_rank0.pt", weights_only=False)["epoch"]
    out = tmp_path / "one_process"
    # run.epochs = the checkpoint's epoch: no more training, only the final evaluation of that model.
    proc = run_train([f"data.dir={synthetic_data}", *TINY_MODEL, *args, f"run.resume={ckpt}", f"run.epochs={epoch}"],
                     out, nproc=1)  # fmt: skip
    assert "resharded" in proc.stderr
    final = json.loads((out / "final_metrics.json").read_text())
    for split in ("valid", "test"):
        for key, value in run.final[split].items():
            assert final[split][key] == pytest.approx(value, abs=1e-6), (split, key)


def test_a_stale_deepspeed_build_lock_is_named_instead_of_hanging(tmp_path, monkeypatch):
    """A build killed mid-way leaves <extensions>/<op>/lock, on which DeepSpeed would wait forever."""
    import os
    import time

    from torch import nn

    from train.zero import STALE_LOCK_SECONDS, build_engine, stale_build_locks

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    fresh = tmp_path / "deepspeed_shm_comm" / "lock"  # a build in progress: left alone
    fresh.parent.mkdir()
    fresh.touch()
    assert fresh not in stale_build_locks()
    old = time.time() - STALE_LOCK_SECONDS - 60
    os.utime(fresh, (old, old))
    assert fresh in stale_build_locks()
    cfg = load_train_config(None, [])
    with pytest.raises(RuntimeError, match=f"stale build lock .*rm .*{fresh}"):
        build_engine(nn.Linear(2, 2), cfg, {}, total_steps=1)
