"""The sbatch files on a real single-node Slurm (cluster/local_slurm.py brings it up, as root).

Without Slurm (not root, no apt, a daemon that will not start) these tests skip with the reason;
with the environment variable CI set they fail instead. The node has this machine's CPUs (2 here):
training jobs take both, so jobs run one after another. Timings are printed (pytest -s shows them).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cluster.local_slurm import LocalSlurm, SlurmUnavailable
from tests.conftest import ROOT, TINY_MODEL, assert_logged_model_reproduces_predictions

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

TERMINAL = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}
# Tracking on (TINY_MODEL turns it off), without the 10 s system-metrics sampler.
TRACKED = [*TINY_MODEL, "tracking.enabled=true", "tracking.system_metrics=false"]
EXACT = ["data.partition=strided", "run.epochs=2"]


def _timed(label: str, t0: float) -> None:
    print(f"[slurm timing] {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)


@pytest.fixture(scope="session")
def slurm():
    """A running single-node Slurm; stopped at the end if this fixture started it."""
    cluster = LocalSlurm()
    was_running = cluster._pid("slurmctld") is not None
    t0 = time.perf_counter()
    try:
        cluster.start()
    except (SlurmUnavailable, OSError, subprocess.SubprocessError) as exc:
        message = f"no local Slurm: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI is set: the Slurm tests must run)")
        pytest.skip(message)
    _timed("bring-up (install if missing, configure, start, node idle)", t0)
    yield cluster
    if not was_running:
        t0 = time.perf_counter()
        cluster.stop()
        _timed("stop", t0)
        left = [n for n in ("munged", "slurmctld", "slurmd") if cluster._pid(n)]
        assert not left, f"still running after stop: {left}"


def job_env(**extra: str) -> dict[str, str]:
    """What every submitted job gets: this checkout, this interpreter, one thread per process."""
    return {"GENREC_ROOT": str(ROOT), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def submit(
    slurm: LocalSlurm, sbatch_args: list[str], script: str, args: list[str], env: dict[str, str]
) -> str:
    """sbatch and return the job id (the job inherits ``env`` on top of this process's environment)."""
    full_env = {**slurm.env(), **env}
    if "MLFLOW_TRACKING_URI" not in env:  # the trainer's default store (next to the run), unless asked
        full_env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        ["sbatch", "--parsable", "--export=ALL", *sbatch_args, str(ROOT / "slurm" / script), *args],
        env=full_env, capture_output=True, text=True, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_info(slurm: LocalSlurm, job_id: str) -> dict[str, str]:
    """``scontrol show job`` as a dict (JobState, ExitCode, Restarts, ...)."""
    out = slurm.run("scontrol", "show", "job", "-o", job_id).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_job(slurm: LocalSlurm, job_id: str, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Poll until the job (and any requeue of it) has ended; returns its final ``job_info``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = job_info(slurm, job_id)
        if info.get("JobState") in TERMINAL:
            return info
        time.sleep(1)
    slurm.run("scancel", job_id, check=False)
    tail = log.read_text()[-4000:] if log and log.is_file() else ""
    raise AssertionError(
        f"job {job_id} still {job_info(slurm, job_id).get('JobState')} after {timeout} s\n{tail}"
    )


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def jsonl_losses(path: Path) -> dict[int, float]:
    out = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "train/loss" in rec:
            out[rec["step"]] = rec["train/loss"]
    return out


def train_args(synthetic_data: Path, output_dir: Path, experiment: str) -> list[str]:
    # eval.exclude=input_window: the logged model can only exclude the history it is given (its input),
    # and its ranking is compared with the trainer's test predictions below.
    return [f"data.dir={synthetic_data}", *TRACKED, *EXACT, f"run.output_dir={output_dir}",
            f"tracking.experiment={experiment}", "eval.exclude=input_window"]  # fmt: skip


@pytest.fixture(scope="session")
def slurm_train(slurm, synthetic_data, tmp_path_factory):
    """One uninterrupted 2-process training job through slurm/train.sbatch (shared by two tests)."""
    base = tmp_path_factory.mktemp("slurm_train")
    out, log = base / "run", base / "job.out"
    t0 = time.perf_counter()
    job = submit(
        slurm, ["--cpus-per-task=2", f"--output={log}"], "train.sbatch",
        [str(ROOT / "configs" / "demo.yaml"), *train_args(synthetic_data, out, "slurm-train")],
        job_env(NPROC_PER_NODE="2", LOG_DIR=str(base / "logs")),
    )  # fmt: skip
    info = wait_job(slurm, job, 600, log)
    _timed("train.sbatch, 2 processes, 2 epochs", t0)
    return {"job": job, "info": info, "out": out, "log": log, "logs": base / "logs"}


def test_train_sbatch_two_processes(slurm_train, synthetic_data):
    from mlflow import MlflowClient

    info, out, log = slurm_train["info"], slurm_train["out"], slurm_train["log"]
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()[-4000:]
    text = log.read_text()
    assert "[default0]:" in text and "[default1]:" in text  # every rank's lines, prefixed
    assert "launch: torchrun: rank 0/2 (local 0/2, node 0/1)" in text
    rank_logs = sorted(
        p.relative_to(slurm_train["logs"]).parts[-2] for p in slurm_train["logs"].rglob("stderr.log")
    )
    assert rank_logs == ["0", "1"]
    final = read_json(out / "final_metrics.json")
    ckpt = out / "checkpoints" / f"step_{final['steps']:08d}"
    assert read_json(ckpt / "meta.json")["world_size"] == 2 and (ckpt / "trainer_rank1.pt").is_file()
    assert final["epochs"] == 2 and 0 < final["test"]["hr@10"] <= 1

    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm_job_id"] == slurm_train["job"] and run.data.tags["world_size"] == "2"
    assert run.data.metrics["test/hr_at_10"] == pytest.approx(final["test"]["hr@10"])
    assert run.data.metrics["test/ndcg_at_10"] == pytest.approx(final["test"]["ndcg@10"])
    # The prepared data as the run's dataset input: its profile is the manifest's counts and checksums.
    (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
    profile, manifest = json.loads(dataset.profile), read_json(synthetic_data / "manifest.json")
    assert profile["num_interactions"] == manifest["num_interactions"]
    assert profile["splits"]["test"]["files"] == {
        f["path"]: f["sha256"] for f in manifest["splits"]["test"]["files"]
    }
    assert_logged_model_reproduces_predictions(run, out, synthetic_data)


def test_preempted_job_checkpoints_requeues_and_ends_like_the_uninterrupted_one(slurm, slurm_train, synthetic_data,
                                                                                tmp_path):  # fmt: skip
    from mlflow import MlflowClient

    out, log = tmp_path / "run", tmp_path / "job.out"
    t0 = time.perf_counter()
    job = submit(
        slurm, ["--cpus-per-task=2", f"--output={log}"], "train.sbatch",
        [str(ROOT / "configs" / "demo.yaml"), *train_args(synthetic_data, out, "slurm-preempt")],
        job_env(NPROC_PER_NODE="2", LOG_DIR=str(tmp_path / "logs")),
    )  # fmt: skip
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").is_file() and len(jsonl_losses(out / "metrics.jsonl")) >= 3):
        assert time.monotonic() < deadline, log.read_text()[-3000:] if log.is_file() else "no log"
        time.sleep(0.5)
    # What Slurm does before the time limit with --signal=B:USR1@T, here on demand.
    slurm.run("scancel", "--batch", "--signal=USR1", job)
    info = wait_job(slurm, job, 600, log)
    _timed("train.sbatch signalled, requeued and resumed", t0)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text[-4000:]
    stopped = int(re.search(r"stopped at step (\d+) on a pre-timeout signal", text).group(1))
    reference = slurm_train["out"]
    total = read_json(reference / "final_metrics.json")["steps"]
    assert 3 <= stopped < total, (stopped, total)  # it really stopped in the middle
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped:08d}'}" in text and "attempt 1" in text
    # Same trajectory and the same final metrics as the uninterrupted job.
    full, resumed = jsonl_losses(reference / "metrics.jsonl"), jsonl_losses(out / "metrics.jsonl")
    assert sorted(resumed) == sorted(full) == list(range(1, total + 1))
    np.testing.assert_allclose([resumed[s] for s in full], [full[s] for s in full], rtol=1e-6, atol=1e-7)
    final, ref_final = read_json(out / "final_metrics.json"), read_json(reference / "final_metrics.json")
    for split in ("valid", "test"):
        for key, value in ref_final[split].items():
            assert final[split][key] == pytest.approx(value, abs=1e-6), (split, key)
    # One MLflow run across both attempts, each step's loss logged once.
    client = MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("slurm-preempt").experiment_id])
    assert run.info.run_id == (out / "mlflow_run_id").read_text().strip() and run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, total + 1))
    assert run.data.metrics["test/hr_at_10"] == pytest.approx(ref_final["test"]["hr@10"], abs=1e-6)


def test_data_pipeline_sbatch_matches_a_local_prepare(slurm, synthetic_data, tmp_path):
    manifest = read_json(synthetic_data / "manifest.json")
    log_path = manifest["inputs"][0]["path"]
    out, log = tmp_path / "prepared", tmp_path / "job.out"
    # The same overrides as the synthetic_data fixture (tests/conftest.py), another output dir.
    args = [str(ROOT / "configs" / "data" / "synthetic.yaml"), f"input.paths=[{log_path}]", "input.item_metadata=null",
            f"output.dir={out}", "max_seq_len=20", "output.row_group_size=64", "split.older_windows=true"]  # fmt: skip
    t0 = time.perf_counter()
    job = submit(slurm, ["--cpus-per-task=2", f"--output={log}"], "data_pipeline.sbatch", args, job_env())
    info = wait_job(slurm, job, 600, log)
    _timed("data_pipeline.sbatch (Ray head + prepare)", t0)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), text[-4000:]
    assert "Ray runtime started" in text and "stopping Ray" in text
    got = read_json(out / "manifest.json")
    for key in ("num_users", "num_items", "num_interactions", "num_input_records", "num_rejected", "splits"):
        assert got[key] == manifest[key], key  # splits: row counts and every data file's sha256
    assert got["input_fingerprint"] == manifest["input_fingerprint"]
    # Nothing of that job's Ray is left (its session dir name holds the job id).
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert f"/tmp/ray-{job}" not in ps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def test_sweep_job_array_under_one_parent_run_on_a_tracking_server(slurm, synthetic_data, tmp_path):
    from mlflow import MlflowClient

    server_dir = tmp_path / "mlflow-server"
    t0 = time.perf_counter()
    server = submit(slurm, [f"--output={tmp_path / 'server.out'}"], "mlflow_server.sbatch", [],
                    job_env(MLFLOW_DIR=str(server_dir), MLFLOW_PORT=str(_free_port())))  # fmt: skip
    try:
        address_file = server_dir / "address"
        deadline = time.monotonic() + 180
        while not address_file.is_file():
            assert time.monotonic() < deadline, (tmp_path / "server.out").read_text()[-3000:]
            assert job_info(slurm, server)["JobState"] in ("PENDING", "RUNNING"), (
                tmp_path / "server.out"
            ).read_text()
            time.sleep(1)
        uri = address_file.read_text().strip()
        _timed("mlflow_server.sbatch up", t0)
        grid = tmp_path / "grid.yaml"
        overrides = [f"data.dir={synthetic_data}", *TRACKED, "run.epochs=1", "data.partition=strided"]
        grid.write_text(json.dumps({
            "config": str(ROOT / "configs" / "demo.yaml"), "name": "lr3", "experiment": "slurm-sweep",
            "output_root": str(tmp_path / "sweeps"), "overrides": overrides,
            "grid": {"optim.lr": [0.0005, 0.002, 0.008]},
        }))  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "cluster", "sweep", "--grid", str(grid),
             "--sbatch-args", f"--cpus-per-task=1 --output={tmp_path}/array-%A_%a.out"],
            env={**slurm.env(), **job_env(MLFLOW_TRACKING_URI=uri, NPROC_PER_NODE="1"), "PYTHONPATH": str(ROOT)},
            capture_output=True, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        info = json.loads(proc.stdout)
        report_info = wait_job(slurm, info["report_job_id"], 600)
        _timed("sweep: 3-point job array + report job", t0)
        for i in range(3):
            task = job_info(slurm, f"{info['array_job_id']}_{i}")
            assert (task["JobState"], task["ExitCode"]) == ("COMPLETED", "0:0"), i
        assert report_info["JobState"] == "COMPLETED", (tmp_path / "sweeps" / "lr3").glob("report-*.out")

        client = MlflowClient(uri)
        parent = client.get_run(info["parent_run_id"])
        assert parent.info.status == "FINISHED"
        exp = client.get_experiment_by_name("slurm-sweep")
        children = client.search_runs(
            [exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
        )
        assert sorted(c.data.params["optim.lr"] for c in children) == ["0.0005", "0.002", "0.008"]
        assert all(
            c.info.status == "FINISHED" and c.info.artifact_uri.startswith("mlflow-artifacts:")
            for c in children
        )
        # The report: one row per child with its own final metric, logged to the parent run.
        csv_text = (tmp_path / "sweeps" / "lr3" / "report" / "runs.csv").read_text().splitlines()
        header = csv_text[0].split(",")
        assert "optim.lr" in header and "test/hr_at_10" in header and len(csv_text) == 4
        by_id = {c.info.run_id: c for c in children}
        for line in csv_text[1:]:
            cells = dict(zip(header, line.split(",")))
            child = by_id[cells["run_id"]]
            assert cells["optim.lr"] == child.data.params["optim.lr"]
            assert float(cells["test/hr_at_10"]) == pytest.approx(
                child.data.metrics["test/hr_at_10"], abs=1e-4
            )
            assert float(cells["tokens/s"]) > 0
        assert {a.path for a in client.list_artifacts(parent.info.run_id, "report")} == {
            "report/runs.csv", "report/comparison.png"}  # fmt: skip
        assert (server_dir / "mlflow.db").is_file()  # the server's own store, not the runs' directories
        assert not (tmp_path / "sweeps" / "lr3" / "mlflow.db").exists()
    finally:
        slurm.run("scancel", server, check=False)
        wait_job(slurm, server, 60)
    assert not (server_dir / "address").exists()
