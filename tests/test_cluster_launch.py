"""Launch pieces without a Slurm: environment detection, the run-dir lock, trainer-state loading,
sweep grids and the report table on a real (SQLite) MLflow store."""

from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from cluster.env import detect, first_host
from cluster.preemption import PreemptionHandler, mark_stopped
from tests.conftest import ROOT
from train.checkpoint import load_trainer_state
from train.run_lock import RunDirLocked, RunLock, acquire_run_lock

# ------------------------------------------------------------------------------ environment detection

TORCHRUN_ENV = {
    "RANK": "5", "LOCAL_RANK": "1", "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "2",
    "GROUP_WORLD_SIZE": "4", "MASTER_ADDR": "gpu03", "MASTER_PORT": "29511", "TORCHELASTIC_RUN_ID": "77",
    # torchrun inside a Slurm step: the Slurm task variables describe the agent, not this worker
    "SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "4",
}  # fmt: skip


def test_detect_torchrun_wins_over_the_slurm_step_around_it():
    env = detect(TORCHRUN_ENV)
    assert env.launcher == "torchrun"
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (5, 1, 8, 2)
    assert (env.num_nodes, env.node_rank) == (4, 2)
    assert (env.master_addr, env.master_port, env.job_id) == ("gpu03", 29511, "77")


def test_detect_slurm_step_without_torchrun():
    slurm = {
        "SLURM_JOB_ID": "12345", "SLURM_STEP_ID": "0", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
        "SLURM_NODEID": "1", "SLURM_STEP_NUM_TASKS": "4", "SLURM_STEP_NUM_NODES": "2",
        "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
    }  # fmt: skip
    env = detect(slurm)
    assert env.launcher == "slurm"
    assert (env.rank, env.local_rank, env.world_size, env.local_world_size) == (3, 1, 4, 2)
    assert (env.num_nodes, env.node_rank, env.master_addr) == (2, 1, "gpu07")
    assert env.master_port == 20000 + 12345 % 10000
    assert detect({**slurm, "MASTER_PORT": "31000", "MASTER_ADDR": "head"}).master_port == 31000
    exported = {}
    env.export(exported)
    assert exported == {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                        "MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 12345 % 10000)}  # fmt: skip


def test_detect_batch_script_and_plain_process_are_one_local_rank():
    # Inside the batch script (no SLURM_STEP_ID) a plain `python -m train` is one process, not rank 0 of N.
    env = detect(
        {"SLURM_JOB_ID": "9", "SLURM_PROCID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "n[1-4]"}
    )
    assert (env.launcher, env.rank, env.world_size, env.num_nodes, env.job_id) == ("local", 0, 1, 1, "9")
    assert 0 < detect({}).master_port < 65536


@pytest.mark.parametrize(
    "nodelist, first",
    [
        ("node1", "node1"),
        ("gpu[03-05,09]", "gpu03"),
        ("a-b[1,3],c7", "a-b1"),
        ("x[007-010]", "x007"),
        ("h1,h2", "h1"),
    ],
)
def test_first_host_matches_scontrol(nodelist, first):
    assert first_host(nodelist) == first


def test_bad_slurm_number_names_the_variable():
    with pytest.raises(ValueError, match="SLURM_PROCID"):
        detect({"SLURM_STEP_ID": "0", "SLURM_PROCID": "x"})


# ---------------------------------------------------------------------------------- preemption flag


def test_usr1_sets_the_flag_and_the_marker_names_the_step(tmp_path, monkeypatch):
    import os
    import signal

    handler = PreemptionHandler().install()
    try:
        assert not handler.should_stop(torch.device("cpu"))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert handler.should_stop(torch.device("cpu")) and handler.signal_name == "SIGUSR1"
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    monkeypatch.setenv("GENREC_STOP_MARKER", str(tmp_path / "m" / "stop.json"))
    marker = mark_stopped(17, tmp_path, is_main=True)
    assert '"step": 17' in marker.read_text()
    assert mark_stopped(17, tmp_path, is_main=False) is None


# ------------------------------------------------------------------------------------ run-dir lock

HOLD = """
import sys, time
from train.run_lock import RunLock
lock = RunLock(sys.argv[1]); lock.acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_second_job_on_the_same_output_dir_is_refused_with_the_holder(tmp_path):
    env = {"PYTHONPATH": str(ROOT), "SLURM_JOB_ID": "4242", "PATH": "/usr/bin:/bin"}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirLocked) as info:
            acquire_run_lock(tmp_path, is_main=True, device=torch.device("cpu"))
        message = str(info.value)
        assert (
            '"job_id": "4242"' in message and f'"pid": {holder.pid}' in message and str(tmp_path) in message
        )
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the dead holder's lock: the directory is free again, no stale lock.
    lock = acquire_run_lock(tmp_path, is_main=True, device=torch.device("cpu"))
    assert f'"pid": {__import__("os").getpid()}' in (tmp_path / ".lock").read_text()
    with pytest.raises(RunDirLocked):  # another open file description in this very process
        RunLock(tmp_path).acquire()
    lock.release()
    RunLock(tmp_path).acquire()


# ------------------------------------------------------------------------------ trainer state files


class NotPlain:
    """Anything that is not a plain type or tensor."""

    def __init__(self):
        self.x = 1


def test_trainer_state_loads_plain_types_and_refuses_pickled_objects(tmp_path):
    good = {
        "step": 7,
        "best_metric": float("-inf"),
        "history": [{"step": 1, "train/loss": 0.5}],
        "t": torch.ones(2),
    }
    torch.save(good, tmp_path / "trainer_rank0.pt")
    loaded = load_trainer_state(tmp_path / "trainer_rank0.pt")
    assert (
        loaded["step"] == 7 and loaded["history"] == good["history"] and torch.equal(loaded["t"], good["t"])
    )
    torch.save({"step": 7, "evil": NotPlain()}, tmp_path / "trainer_rank1.pt")
    with pytest.raises(ValueError, match="trainer_rank1.pt holds more than plain"):
        load_trainer_state(tmp_path / "trainer_rank1.pt")


# ------------------------------------------------------------------------------------ sweep grids


def test_grid_expands_to_the_cartesian_product_and_rejects_bad_keys(tmp_path):
    from cluster.config import ConfigError
    from cluster.sweep import load_grid, point_overrides

    grid = tmp_path / "g.yaml"
    grid.write_text(textwrap.dedent(f"""\
        config: {ROOT / "configs" / "demo.yaml"}
        name: s1
        output_root: {tmp_path / "out"}
        overrides: [run.epochs=1]
        grid:
          optim.lr: [0.001, 0.003]
          model.num_blocks: [1, 2, 3]
    """))  # fmt: skip
    spec = load_grid(grid)
    points = spec.points()
    assert len(points) == 6 and points[0] == ["optim.lr=0.001", "model.num_blocks=1"]
    assert points[5] == ["optim.lr=0.003", "model.num_blocks=3"]
    full = point_overrides(spec, 5, points[5], "a" * 32, ["zero.stage=1"])
    assert (
        full[:2] == ["run.epochs=1", "zero.stage=1"]
        and f"run.output_dir={tmp_path / 'out' / 's1' / 'point-5'}" in full
    )
    assert "tracking.parent_run_id=" + "a" * 32 in full
    grid.write_text(grid.read_text() + "gird: {}\n")
    with pytest.raises(ConfigError, match="gird"):
        load_grid(grid)


# -------------------------------------------------------------------------------------- the report


def test_report_table_on_a_real_mlflow_store(tmp_path):
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from cluster.report import report

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment("sw", artifact_location=(tmp_path / "art").as_uri())
    parent = client.create_run(exp, run_name="sweep").info.run_id
    other_parent = client.create_run(exp, run_name="other-sweep").info.run_id
    expected = {}
    for i, (lr, hr) in enumerate([(0.001, 0.21), (0.003, 0.25), (0.01, 0.19)]):
        run = client.create_run(exp, run_name=f"p{i}", tags={"mlflow.parentRunId": parent}).info.run_id
        params = [
            Param("optim.lr", str(lr)),
            Param("model.num_blocks", "1"),
            Param("run.output_dir", f"/x/{i}"),
        ]
        now = int(time.time() * 1000)
        metrics = [Metric("test/hr_at_10", hr, now, 10), Metric("test/ndcg_at_10", hr / 2, now, 10)]
        metrics += [
            Metric("train/tokens_per_s", 1000.0 * (i + 1) + d, now, s) for s, d in ((1, -10), (2, 10))
        ]
        client.log_batch(run, params=params, metrics=metrics)
        client.set_terminated(run, "FINISHED")
        expected[f"p{i}"] = (str(lr), f"{hr:.4f}", f"{1000 * (i + 1):.0f}")
    stray = client.create_run(exp, run_name="stray", tags={"mlflow.parentRunId": other_parent}).info.run_id
    client.log_batch(stray, params=[Param("optim.lr", "9")])

    text = report("sw", tracking_uri=uri, parent=parent, out=tmp_path / "rep", finish_parent=True)
    header = text.splitlines()[0].split()
    assert header[:3] == ["run", "status", "optim.lr"]  # num_blocks and output_dir are not "differing"
    assert "model.num_blocks" not in header and "run.output_dir" not in header and "stray" not in text
    with open(tmp_path / "rep" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["p0", "p1", "p2"]
    for r in rows:
        assert (r["optim.lr"], r["test/hr_at_10"], r["tokens/s"]) == expected[r["run"]]
        assert r["status"] == "FINISHED" and float(r["wall_s"]) >= 0
    assert (tmp_path / "rep" / "comparison.png").stat().st_size > 10_000
    logged = {a.path for a in client.list_artifacts(parent, "report")}
    assert logged == {"report/runs.csv", "report/comparison.png"}
    assert client.get_run(parent).info.status == "FINISHED"
    # Without --parent: every non-parent run of the experiment (the stray one too).
    text = report("sw", tracking_uri=uri, out=tmp_path / "rep2")
    assert "stray" in text and "sweep" not in text.split("\n", 2)[2]


@pytest.mark.slow
@pytest.mark.distributed
def test_local_sweep_runs_each_point_under_one_parent(synthetic_data, tmp_path):
    """``python -m cluster sweep --local``: torchrun per point, one after another, then the report."""
    import json

    from mlflow import MlflowClient

    from tests.conftest import TINY_MODEL

    grid = tmp_path / "grid.yaml"
    grid.write_text(json.dumps({
        "config": str(ROOT / "configs" / "demo.yaml"), "name": "local2", "experiment": "local-sweep",
        "output_root": str(tmp_path / "sweeps"),
        "overrides": [f"data.dir={synthetic_data}", *TINY_MODEL, "tracking.enabled=true",
                      "tracking.system_metrics=false", "tracking.log_model=false", "run.epochs=1"],
        "grid": {"model.num_blocks": [1, 2]},
    }))  # fmt: skip
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run([sys.executable, "-m", "cluster", "sweep", "--grid", str(grid), "--local", "--nproc", "1"],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout)
    client = MlflowClient(info["tracking_uri"])
    assert info["tracking_uri"] == f"sqlite:///{tmp_path / 'sweeps' / 'local2' / 'mlflow.db'}"
    exp = client.get_experiment_by_name("local-sweep")
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{info['parent_run_id']}'")
    assert sorted(c.data.params["model.num_blocks"] for c in children) == ["1", "2"]
    for c in children:
        point = int(c.info.run_name.rsplit("-", 1)[1])
        final = json.loads(
            (tmp_path / "sweeps" / "local2" / f"point-{point}" / "final_metrics.json").read_text()
        )
        assert c.data.metrics["test/hr_at_10"] == pytest.approx(final["test"]["hr@10"])
    assert client.get_run(info["parent_run_id"]).info.status == "FINISHED"
    rows = (tmp_path / "sweeps" / "local2" / "report" / "runs.csv").read_text().splitlines()
    assert len(rows) == 3 and "model.num_blocks" in rows[0]
