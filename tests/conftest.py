"""Shared fixtures: the real data folder, a small prepared synthetic data set, and a trainer launcher.

Trainer runs go through the real command line (``python -m train`` for one process,
``torchrun --standalone --nproc-per-node 2 -m train`` for two), with gloo on CPU; runs with the
same arguments are cached for the session so several tests can compare them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_data_dir(name: str) -> Path:
    """``../shared/data/<name>``, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the licensed data sets live outside the repository; CI has them)")
    return path


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory) -> Path:
    """A small synthetic log run through the real Ray prepare job (once per session)."""
    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare
    from data_pipeline.synthetic import GenerateConfig, generate

    base = tmp_path_factory.mktemp("synthetic")
    log = generate(GenerateConfig(output_dir=str(base / "raw"), num_users=400, num_items=120, mean_seq_len=20,
                                  num_topics=12, with_item_text=False, seed=3))  # fmt: skip
    cfg = load_config(
        PrepareConfig,
        ROOT / "configs" / "data" / "synthetic.yaml",
        [f"input.paths=[{log}]", "input.item_metadata=null", f"output.dir={base / 'prepared'}",
         "max_seq_len=20", "output.row_group_size=64", "ray.num_cpus=2", "split.older_windows=true"],
    )  # fmt: skip
    prepare(cfg)
    return base / "prepared"


TINY_MODEL = [
    "model.embedding_dim=32", "model.num_blocks=1", "model.attention_dim=16", "model.linear_dim=16",
    "model.dropout=0.0", "model.max_seq_len=20", "loss.negatives=shared", "loss.num_negatives=64",
    "data.batch_size=32", "data.eval_batch_size=64", "run.log_every_steps=1", "run.progress_bar=off",
    "tracking.enabled=false",
]  # fmt: skip


# TIGER at test size: the paper's architecture, 1+1 layers of width 32, on random 3+1-level semantic IDs.
TINY_TIGER = [
    "model.name=tiger", "model.d_model=32", "model.num_encoder_layers=1", "model.num_decoder_layers=1",
    "model.num_heads=2", "model.head_dim=16", "model.d_ff=64", "model.dropout=0.0", "model.num_user_buckets=50",
    "model.max_history_items=8", "model.beam_size=10", "eval.hr_at=[1,5,10]", "eval.ndcg_at=[5,10]",
    "data.batch_size=32", "data.eval_batch_size=64", "run.log_every_steps=1", "run.progress_bar=off",
    "tracking.enabled=false",
]  # fmt: skip


# GRU4Rec and BERT4Rec at test size: 2 GRU layers of 24 over 32-wide items (sampled softmax); one
# bidirectional block of 2 heads, cloze masking with probability 0.3, the exact softmax over items.
_TINY_RUN = ["data.batch_size=32", "data.eval_batch_size=64", "run.log_every_steps=1", "run.progress_bar=off",
             "tracking.enabled=false"]  # fmt: skip
TINY_GRU4REC = [
    "model.name=gru4rec", "model.embedding_dim=32", "model.hidden_size=24", "model.num_layers=2",
    "model.dropout=0.0", "model.max_seq_len=20", "loss.negatives=shared", "loss.num_negatives=64", *_TINY_RUN,
]  # fmt: skip
TINY_BERT4REC = [
    "model.name=bert4rec", "model.embedding_dim=32", "model.num_blocks=1", "model.num_heads=2", "model.ffn_dim=32",
    "model.dropout=0.0", "model.attn_dropout=0.0", "model.max_seq_len=20", "model.mask_prob=0.3",
    "loss.negatives=full", *_TINY_RUN,
]  # fmt: skip


@pytest.fixture(scope="session")
def synthetic_semantic_ids(synthetic_data, tmp_path_factory) -> Path:
    """Random unique semantic IDs (3 levels of 8 codes + a collision token) for the synthetic items.

    Made by the ``semantic-ids-random`` command a user would run.
    """
    from data_pipeline.semantic_ids.random_ids import main as random_ids_main

    out = tmp_path_factory.mktemp("semantic_ids")
    argv = ["--prepared", str(synthetic_data), "--output", str(out), "--levels", "3", "--codebook-size", "8"]
    assert random_ids_main(argv) == 0
    return out


@pytest.fixture(scope="session")
def family_args(synthetic_data, synthetic_semantic_ids):
    """``family_args(family)``: the data and tiny-model overrides of a model family's test runs."""

    def get(family: str = "hstu") -> list[str]:
        if family == "tiger":
            model = [*TINY_TIGER, f"model.semantic_ids_dir={synthetic_semantic_ids}"]
        else:
            model = {"hstu": TINY_MODEL, "gru4rec": TINY_GRU4REC, "bert4rec": TINY_BERT4REC}[family]
        return [f"data.dir={synthetic_data}", *model]

    return get


class TrainRun:
    """The outputs of one finished ``python -m train`` run."""

    def __init__(self, output_dir: Path, proc: subprocess.CompletedProcess):
        self.output_dir = output_dir
        self.proc = proc

    @property
    def losses(self) -> dict[int, float]:
        """step -> train loss (the last record wins, so a resumed run's re-logged steps replace old ones)."""
        out = {}
        for line in (self.output_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "train/loss" in rec:
                out[rec["step"]] = rec["train/loss"]
        return out

    @property
    def final(self) -> dict:
        return json.loads((self.output_dir / "final_metrics.json").read_text())


def run_train(args: list[str], output_dir: Path, nproc: int = 1, check: bool = True, timeout: int = 600,
              env: dict[str, str] | None = None):  # fmt: skip
    """Run the trainer's real command line; returns the CompletedProcess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    if nproc == 1:
        cmd = [sys.executable, "-m", "train"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "train",
        ]
    cmd += [*args, f"run.output_dir={output_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-6000:]}")
    # The process groups were really torn down before exit (see destroy_distributed). Not under
    # ZeRO-3: DeepSpeed keeps that engine alive through references Python's collector cannot see.
    # The stage is read from the run's resolved config, wherever it was set.
    if check and yaml.safe_load((output_dir / "config.yaml").read_text())["zero"]["stage"] != 3:
        from train.distributed import GLOO_THREADS_LEFT

        assert GLOO_THREADS_LEFT not in proc.stderr, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="session")
def train_runs(tmp_path_factory, family_args):
    """``train_runs(args, nproc, family)`` -> ``TrainRun``, cached per (args, nproc, family) for the session."""
    cache: dict[tuple, TrainRun] = {}
    base = tmp_path_factory.mktemp("train_runs")

    def get(args: list[str], nproc: int = 1, family: str = "hstu") -> TrainRun:
        key = (tuple(args), nproc, family)
        if key not in cache:
            out = base / f"run{len(cache)}"
            full = [*family_args(family), *args]
            cache[key] = TrainRun(out, run_train(full, out, nproc))
        return cache[key]

    return get


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip, with the reason, on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def assert_logged_model_reproduces_predictions(run, out: Path, data_dir: Path) -> None:
    """The logged pyfunc, loaded back, ranks as the trainer's own test predictions did (40 test users'
    last 20 items as the history: the tiny models' max_seq_len)."""
    import mlflow
    import pandas as pd
    import pyarrow.parquet as pq

    from train.tracking import global_tracking_uri

    (output,) = run.outputs.model_outputs
    with global_tracking_uri(f"sqlite:///{out.parent / 'mlflow.db'}"):  # not leaked to later jobs' env
        model = mlflow.pyfunc.load_model(f"models:/{output.model_id}")
    items = pq.read_table(data_dir / "vocab" / "items.parquet").to_pydict()
    users = pq.read_table(data_dir / "vocab" / "users.parquet").to_pydict()
    raw_item = dict(zip(items["dense_id"], items["raw_id"]))
    raw_user = dict(zip(users["dense_id"], users["raw_id"]))
    test = pq.read_table(data_dir / "test").to_pylist()
    expected = {r["user_id"]: r for r in pq.read_table(out / "test_predictions.parquet").to_pylist()}
    rows, truth = [], []
    for r in test:
        history, target = r["item_ids"][-21:-1], r["item_ids"][-1]
        if target in history:  # the trainer's file never excludes the target; the model cannot know it
            continue
        rows.append({"history": [raw_item[i] for i in history], "timestamps": r["timestamps"][-21:-1],
                     "query_timestamp": r["timestamps"][-1]})  # fmt: skip
        truth.append(expected[raw_user[r["user_id"]]]["top_item_ids"][:10])
        if len(rows) == 40:
            break
    got = model.predict(pd.DataFrame(rows), params={"k": 10})["top_item_ids"].tolist()
    assert len(rows) == 40
    assert [list(g) for g in got] == truth
