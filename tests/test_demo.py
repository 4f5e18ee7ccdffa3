"""The README's main command, ``python -m train.demo`` (what ``bash cluster/dev.sh demo`` runs), end to end.

The demo writes into the project tree (``data/``, ``runs/``), so it runs in a copy of the code's
folders in a temporary directory: synthetic log -> Ray prepare -> HSTU on 2 processes -> eval -> MLflow,
with its own defaults and no overrides. A few minutes on the shared 2-core machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def test_demo_end_to_end(tmp_path):
    from mlflow import MlflowClient

    from train.tracking import metric_key

    for name in ("cluster", "configs", "data_pipeline", "train"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    for key in ("RANK", "WORLD_SIZE", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "train.demo"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]

    out = tmp_path / "runs" / "demo"
    final = json.loads((out / "final_metrics.json").read_text())
    test = final["test"]
    # What it prints is what it wrote.
    assert f"Test metrics ({test['num_users']} users" in proc.stdout
    for key in ("hr@10", "ndcg@10", "hr@50", "mrr"):
        assert f"{key:8s} {test[key]:.4f}" in proc.stdout, key
    # It learned: far above the popularity ranking (measured: HR@10 0.57 against 0.22), loss going down.
    assert test["hr@10"] > 1.5 * final["popularity_test"]["hr@10"], (test, final["popularity_test"])
    assert test["ndcg@10"] > 1.5 * final["popularity_test"]["ndcg@10"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
    steps = sorted(losses)
    assert len(steps) >= 10 and losses[steps[-1]] < 0.7 * losses[steps[0]], losses
    assert final["epochs"] == 6 and 0 <= final["steps"] - steps[-1] < 5  # a loss every 5 steps

    # The MLflow run holds the same values as the files.
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert uri in proc.stdout  # the printed `mlflow ui` command opens this store
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (out / "mlflow_run_id").read_text().strip()
    assert run.data.params["model.name"] == "hstu" and run.data.params["zero.stage"] == "2"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step: m.value for m in history} == losses
    valid = {r["step"]: r["valid/ndcg@10"] for r in records if "valid/ndcg@10" in r}
    assert len(valid) == 6
    assert {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, metric_key("valid/ndcg@10"))
    } == valid
    for key, value in test.items():
        assert run.data.metrics[metric_key(f"test/{key}")] == pytest.approx(value, rel=1e-12), key
    # The system monitor ran: memory in use is always positive. CPU % can read 0.0 when the run is
    # short enough for a single sample (psutil's first reading has no interval to measure over).
    cpu = [m.value for m in client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")]
    assert cpu and all(0.0 <= v <= 100.0 for v in cpu), cpu
    memory = [
        m.value for m in client.get_metric_history(run.info.run_id, "system/system_memory_usage_megabytes")
    ]
    assert memory and min(memory) > 0.0, memory
    logged = client.download_artifacts(run.info.run_id, "final_metrics.json", str(tmp_path / "artifacts"))
    assert json.loads(open(logged).read()) == final
