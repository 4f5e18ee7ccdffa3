"""Tests for train/tracking.py and train/plots.py against real MLflow stores (no mocks).

SQLite-store tests share one database per module (creating its tables takes several seconds); each
test uses its own run directory and experiment. The tracking-server test starts ``mlflow server``
as a subprocess on a free port and is marked slow (~25 s on 2 cores, mostly server start-up).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import matplotlib.image
import pytest

from cluster.config import ConfigError, load_config
from train.plots import panel_layout, plot_history
from train.tracking import (
    HTTP_ENV_DEFAULTS,
    MAX_PARAM_VALUE_LENGTH,
    RUN_ID_FILE,
    MLflowTracker,
    NullTracker,
    TrackingConfig,
    default_tags,
    make_tracker,
    metric_key,
    param_value,
    resolve_tracking_uri,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _isolated_mlflow_env(monkeypatch):
    """No outside tracking URI, and the HTTP bounds tracking.py sets are undone after each test."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in HTTP_ENV_DEFAULTS:
        monkeypatch.delenv(key, raising=False)
    # monkeypatch restores (deletes) these at teardown, so setdefault in tracking.py cannot leak.
    for key, value in HTTP_ENV_DEFAULTS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def sqlite_uri(tmp_path_factory) -> str:
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    return f"sqlite:///{db}"


def _client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


# ---------------------------------------------------------------- pure helpers


def test_config_validation_names_the_key(tmp_path):
    assert load_config(TrackingConfig, None, ["log_every_steps=5"]).log_every_steps == 5
    with pytest.raises(ConfigError, match="tracking.log_every_steps"):
        load_config(TrackingConfig, None, ["log_every_steps=0"])
    with pytest.raises(ConfigError, match="tracking.experiment"):
        load_config(TrackingConfig, None, ["experiment=' '"])
    with pytest.raises(ConfigError, match="system_metrics"):
        load_config(TrackingConfig, None, ["system_metrics=maybe"])


def test_uri_resolution_order(monkeypatch):
    default = "sqlite:////out/mlflow.db"
    assert resolve_tracking_uri(TrackingConfig(), default) == default
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert resolve_tracking_uri(TrackingConfig(), default) == "http://env:5000"
    assert resolve_tracking_uri(TrackingConfig(tracking_uri="http://cfg:1"), default) == "http://cfg:1"


def test_metric_key_and_param_value():
    assert metric_key("eval/hr@10") == "eval/hr_at_10"
    assert metric_key("eval/ndcg@10") == "eval/ndcg_at_10"
    assert metric_key("train/loss") == "train/loss"
    assert metric_key("tokens/s (rank0)") == "tokens/s _rank0_"
    assert param_value(3e-4) == "0.0003"
    assert param_value(None) == "None"
    assert param_value([1, "a"]) == '[1, "a"]'
    long = param_value("x" * 10_000)
    assert len(long) == MAX_PARAM_VALUE_LENGTH and long.endswith("...")


def test_default_tags(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    tags = default_tags(world_size=8)
    assert tags["world_size"] == "8"
    assert tags["slurm_job_id"] == "4242"
    assert tags["hostname"] == socket.gethostname()
    assert tags["torch_version"].startswith("2.")
    assert "deepspeed_version" in tags and "torchrec_version" in tags
    repo = Path(__file__).resolve().parents[1]
    if (repo / ".git").exists():
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
        assert tags["git_sha"] == sha.stdout.strip()
    monkeypatch.delenv("SLURM_JOB_ID")
    assert "slurm_job_id" not in default_tags(world_size=1)


def test_plot_history_panels_and_png(tmp_path):
    history = {
        "train/loss": [(10, 2.0), (20, 1.5), (30, 1.2)],
        "eval/loss": [(30, 1.4)],
        "eval/hr_at_10": [(30, 0.1)],
        "eval/ndcg_at_10": [(30, 0.05)],
        "train/lr": [],  # no points: no panel
    }
    assert panel_layout(history) == [
        ("loss", ["eval/loss", "train/loss"]),
        ("eval/hr_at_10", ["eval/hr_at_10"]),
        ("eval/ndcg_at_10", ["eval/ndcg_at_10"]),
    ]
    assert panel_layout({"train/loss": [(1, 1.0)]}) == [("train/loss", ["train/loss"])]
    # valid and test of one metric share a panel; bookkeeping series get none.
    grouped = {"valid/hr_at_10": [(5, 0.2), (10, 0.3)], "test/hr_at_10": [(10, 0.28)], "valid/num_users": [(5, 9.0)],
               "train/epoch": [(5, 1.0)]}  # fmt: skip
    assert panel_layout(grouped) == [("hr_at_10", ["test/hr_at_10", "valid/hr_at_10"])]
    png = plot_history(history, tmp_path / "sub" / "history.png")
    assert png.read_bytes()[:8] == PNG_MAGIC
    # 3 panels -> one row of 3 columns of 4.5 x 3.2 inches at 100 dpi.
    assert matplotlib.image.imread(png).shape[:2] == (320, 1350)
    four = dict(history, **{"train/grad_norm": [(10, 1.0)]})
    assert matplotlib.image.imread(plot_history(four, tmp_path / "four.png")).shape[:2] == (640, 1350)
    with pytest.raises(ValueError, match="no metric points"):
        plot_history({"train/loss": []}, tmp_path / "empty.png")


# ---------------------------------------------------------------- SQLite store


def test_sqlite_store_round_trip(tmp_path, sqlite_uri):
    cfg = TrackingConfig(experiment="roundtrip", system_metrics=False)
    run_dir = tmp_path / "run"
    tracker = make_tracker(cfg, rank=0, run_dir=run_dir, default_uri=sqlite_uri)
    assert isinstance(tracker, MLflowTracker)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == tracker.run_id

    params = {
        "model": {"name": "hstu", "num_blocks": 2, "dims": [64, 64]},
        "optim": {"lr": 3e-4, "schedule": None},
        "note": "n" * 7000,
    }
    params.update({f"extra{i}": i for i in range(150)})  # > 100 params: needs several batches
    tracker.log_params(params)
    losses = {step: 2.0 / step for step in (10, 20, 30)}
    for step, loss in losses.items():
        tracker.log_metrics({"train/loss": loss}, step)
    tracker.log_metrics({"eval/hr@10": 0.25, "eval/ndcg@10": 0.125}, 30)
    tracker.set_tags({**default_tags(world_size=2), "custom": "yes"})
    config_yaml = tmp_path / "config.yaml"
    config_yaml.write_text("model:\n  name: hstu\n")
    tracker.log_artifact(config_yaml)
    tracker.log_dict({"num_items": 3706, "splits": ["train", "valid"]}, "dataset/manifest.json")
    tracker.log_figure_of_history()
    tracker.finish()

    client = _client(sqlite_uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "run"
    assert client.get_experiment(run.info.experiment_id).name == "roundtrip"
    p = run.data.params
    assert p["model.name"] == "hstu" and p["model.num_blocks"] == "2" and p["model.dims"] == "[64, 64]"
    assert p["optim.lr"] == "0.0003" and p["optim.schedule"] == "None"
    assert len(p["note"]) == MAX_PARAM_VALUE_LENGTH
    assert p["extra149"] == "149" and len(p) == 6 + 150
    assert _history(client, tracker.run_id, "train/loss") == sorted(losses.items())
    assert _history(client, tracker.run_id, "eval/hr_at_10") == [(30, 0.25)]
    assert _history(client, tracker.run_id, "eval/ndcg_at_10") == [(30, 0.125)]
    assert run.data.tags["custom"] == "yes" and run.data.tags["world_size"] == "2"
    assert "torch_version" in run.data.tags

    # Artifacts live next to the database, not in the current directory.
    assert run.info.artifact_uri.startswith(Path(sqlite_uri[len("sqlite:///") :]).parent.as_uri())
    out = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "download")))
    assert (out / "config.yaml").read_text() == config_yaml.read_text()

    assert json.loads((out / "dataset" / "manifest.json").read_text())["num_items"] == 3706
    assert (out / "plots" / "history.png").read_bytes()[:8] == PNG_MAGIC


def test_resume_continues_the_same_run(tmp_path, sqlite_uri, caplog):
    cfg = TrackingConfig(experiment="resume", system_metrics=False)
    run_dir = tmp_path / "run"
    first = make_tracker(cfg, rank=0, run_dir=run_dir, default_uri=sqlite_uri)
    first.log_params({"optim": {"lr": 0.1}, "steps": 100})
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": float(step)}, step)
    first.finish("KILLED")  # e.g. preempted by Slurm

    second = make_tracker(cfg, rank=0, run_dir=run_dir, default_uri=sqlite_uri)
    assert second.run_id == first.run_id
    client = _client(sqlite_uri)
    assert client.get_run(second.run_id).info.status == "RUNNING"
    # The figure of the restarted job covers the earlier attempt too.
    assert second.history["train/loss"] == [(1, 1.0), (2, 2.0), (3, 3.0)]
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        second.log_params({"optim": {"lr": 0.1}, "steps": 200, "new_key": "x"})
    assert any("steps ('100' -> '200')" in r.getMessage() for r in caplog.records)
    for step in (4, 5):
        second.log_metrics({"train/loss": float(step)}, step)
    second.finish()

    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    assert [r.info.run_id for r in runs] == [first.run_id]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.1", "steps": "100", "new_key": "x"}
    assert _history(client, run.info.run_id, "train/loss") == [(s, float(s)) for s in range(1, 6)]

    # A run id file naming a run the store does not hold starts a fresh run (and rewrites the file).
    (run_dir / RUN_ID_FILE).write_text("0" * 32)
    third = make_tracker(cfg, rank=0, run_dir=run_dir, default_uri=sqlite_uri)
    assert third.run_id not in (first.run_id, "0" * 32)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == third.run_id
    third.finish()


def test_system_metrics_are_logged(tmp_path, sqlite_uri, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = TrackingConfig(experiment="system", system_metrics=True)
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path / "run", default_uri=sqlite_uri)
    busy_until = time.monotonic() + 2.0
    while time.monotonic() < busy_until:  # keep a core busy, so the CPU samples cannot all be 0
        sum(range(10_000))
    tracker.finish()
    client = _client(sqlite_uri)
    # psutil.cpu_percent: the whole machine's utilisation in percent, averaged over its cores.
    cpu = [m.value for m in client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")]
    assert cpu and all(0.0 <= v <= 100.0 for v in cpu) and max(cpu) > 0.0, cpu
    memory = client.get_run(tracker.run_id).data.metrics["system/system_memory_usage_megabytes"]
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e6  # MLflow's megabytes: 1e6 bytes
    assert 0.0 < memory <= total_mb, (memory, total_mb)
    # System metrics are not training curves: they stay out of the history figure.
    assert not any(key.startswith("system/") for key in tracker.history)


def test_null_tracker_on_other_ranks_writes_nothing(tmp_path):
    out = tmp_path / "out"  # where a real tracker would write: the store and the run directory
    artifact = tmp_path / "artifact.txt"
    artifact.write_text("x")
    for rank, cfg in ((1, TrackingConfig()), (3, TrackingConfig()), (0, TrackingConfig(enabled=False))):
        tracker = make_tracker(
            cfg, rank=rank, run_dir=out / "run", default_uri=f"sqlite:///{out / 'mlflow.db'}"
        )
        assert isinstance(tracker, NullTracker) and tracker.run_id is None
        tracker.set_tags(default_tags(world_size=4))
        tracker.log_params({"a": {"b": 1}})
        tracker.log_metrics({"train/loss": 1.0}, 1)
        tracker.log_artifact(artifact)
        tracker.log_dict({"a": 1}, "a.json")
        tracker.log_figure_of_history()
        tracker.finish("FAILED")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact.txt"]


def test_bad_calls_fail_alike_on_every_rank(tmp_path, sqlite_uri, caplog):
    real = make_tracker(
        TrackingConfig(experiment="bad-calls", system_metrics=False),
        rank=0,
        run_dir=tmp_path / "run",
        default_uri=sqlite_uri,
    )
    null = make_tracker(TrackingConfig(), rank=1, run_dir=tmp_path / "run", default_uri=sqlite_uri)
    for tracker in (real, null):
        with pytest.raises(ValueError, match="must end with"):
            tracker.log_dict({"a": 1}, "a.txt")
        with pytest.raises(ValueError, match="FINISHED"):
            tracker.finish("DONE")
    # A file the trainer failed to write is reported, not raised (only rank 0 would raise).
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        real.log_artifact(tmp_path / "missing.yaml")
    assert any("missing.yaml" in r.getMessage() for r in caplog.records)
    real.finish()
    assert _client(sqlite_uri).get_run(real.run_id).info.status == "FINISHED"


# ---------------------------------------------------------------- tracking server


def test_unreachable_server_warns_and_falls_back_fast(tmp_path, caplog):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        tracker = make_tracker(
            TrackingConfig(tracking_uri=uri), rank=0, run_dir=tmp_path / "run", default_uri="unused"
        )
    assert time.monotonic() - start < 5.0
    assert isinstance(tracker, NullTracker)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(messages) == 1 and uri in messages[0] and "tracking_uri" in messages[0]
    tracker.log_metrics({"train/loss": 1.0}, 1)
    assert not (tmp_path / "run" / RUN_ID_FILE).exists()


@pytest.fixture
def mlflow_server(tmp_path):
    """``mlflow server`` on a free port with a fresh SQLite store; yields (uri, process)."""
    port = _free_port()
    mlflow_bin = Path(sys.executable).parent / "mlflow"
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [
            str(mlflow_bin), "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: the teardown stops uvicorn and its workers
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(
                    f"mlflow server exited with {proc.returncode}:\n{(tmp_path / 'server.log').read_text()}"
                )
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mlflow server did not answer /health within 120 s")
                time.sleep(0.5)
        yield uri, proc
    finally:
        _stop(proc)
        log.close()


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_tracking_server_round_trip_then_outage(tmp_path, mlflow_server, caplog):
    uri, proc = mlflow_server
    cfg = TrackingConfig(tracking_uri=uri, experiment="server", system_metrics=False)
    tracker = make_tracker(cfg, rank=0, run_dir=tmp_path / "run", default_uri="unused")
    assert isinstance(tracker, MLflowTracker)
    tracker.log_params({"model": {"num_blocks": 2}})
    tracker.set_tags({"world_size": "2"})
    for step in (10, 20):
        tracker.log_metrics({"train/loss": 1.0 / step}, step)
    tracker.log_dict({"a": [1, 2]}, "config.yaml")
    tracker.log_figure_of_history()

    client = _client(uri)
    run = client.get_run(tracker.run_id)
    assert run.data.params == {"model.num_blocks": "2"}
    assert run.data.tags["world_size"] == "2"
    assert _history(client, tracker.run_id, "train/loss") == [(10, 0.1), (20, 0.05)]
    out = Path(client.download_artifacts(tracker.run_id, "", str(tmp_path / "download")))
    assert (out / "config.yaml").read_text().split() == ["a:", "-", "1", "-", "2"]
    assert (out / "plots" / "history.png").read_bytes()[:8] == PNG_MAGIC

    # The server goes away mid-training: one warning, no exception, bounded time, metrics kept.
    _stop(proc)
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="train.tracking"):
        for step in (30, 40, 50):
            tracker.log_metrics({"train/loss": 1.0 / step}, step)
        tracker.set_tags({"late": "tag"})
        tracker.log_figure_of_history()
        tracker.finish("FAILED")
    assert time.monotonic() - start < 20.0
    warnings = [r for r in caplog.records if r.name == "train.tracking" and r.levelno == logging.WARNING]
    assert len(warnings) == 1 and uri in warnings[0].getMessage()
    assert [m.step for m in tracker._pending] == [30, 40, 50]  # kept for when the server returns
