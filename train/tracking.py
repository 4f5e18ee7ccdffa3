"""Experiment tracking with MLflow for the trainer.

Only global rank 0 talks to MLflow; every other rank gets a ``NullTracker`` with the same methods,
so the trainer logs unconditionally and never writes ``if rank == 0``:

    tracker = make_tracker(cfg.tracking, rank=rank, run_dir=run_dir,
                           default_uri=f"sqlite:///{output_root.resolve()}/mlflow.db")
    tracker.set_tags(default_tags(world_size))
    tracker.log_params(to_dict(cfg))                     # nested dicts are flattened to a.b.c
    tracker.log_artifact(run_dir / "config.yaml")
    ...
    if step % cfg.tracking.log_every_steps == 0:
        tracker.log_metrics({"train/loss": loss, "train/lr": lr}, step)
    tracker.log_metrics({"eval/hr@10": hr, "eval/ndcg@10": ndcg}, step)   # stored as eval/hr_at_10
    tracker.log_figure_of_history()                      # plots/history.png in the run
    tracker.finish()                                     # finish("FAILED") on the exception path

Where runs go: ``tracking.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``default_uri`` (an
embedded SQLite store; browse it with ``mlflow ui --backend-store-uri sqlite:///<abs path>/mlflow.db``).
SQLite suits one machine; jobs on several nodes should share an ``http://`` tracking server.

Resuming: the run id is kept in ``<run_dir>/mlflow_run_id``; a job restarted in the same run_dir
logs into the same MLflow run (metric history, system metrics and the history figure continue).

Sweeps: ``tracking.parent_run_id`` makes a new run a child of that run (tag ``mlflow.parentRunId``);
``python -m cluster sweep`` sets it. At the end of a run the trainer calls ``log_dataset_input``
(the prepared data: source dir, counts and file checksums as an MLflow dataset input) and
``log_recommender_model`` (the model as an MLflow logged pyfunc model, train/serving.py), on rank 0.

Failures never stop training: an unreachable store at start gives a warning and a ``NullTracker``;
a later logging failure gives one warning, then logging pauses for ``RETRY_AFTER_S`` at a time until
the store answers again. Metrics logged during a pause are kept (up to ``MAX_PENDING_METRICS``) and
sent then; params, tags and artifacts logged during a pause are dropped.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import getpass
import importlib.metadata
import json
import logging
import os
import re
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cluster.config import ConfigError, flatten

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
# MLflow's limits (mlflow.utils.validation): longer values or bigger batches are rejected.
MAX_PARAM_VALUE_LENGTH = 6000
MAX_TAG_VALUE_LENGTH = 8000
MAX_PARAMS_TAGS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
# MLflow's REST client retries each call for ~4 minutes by default; a training step must not wait
# that long for a dead server. Applied with setdefault, so values the user exported win.
HTTP_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
PROBE_TIMEOUT_S = 5.0
RETRY_AFTER_S = 300.0
MAX_PENDING_METRICS = 100_000
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
SYSTEM_METRICS_PREFIX = "system/"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class TrackingConfig:
    """Where and how the trainer records runs (the ``tracking`` section of the train config)."""

    enabled: bool = True
    # None -> $MLFLOW_TRACKING_URI, else the embedded sqlite:///<output_root>/mlflow.db.
    tracking_uri: str | None = None
    experiment: str = "genrec"
    # None -> the run directory's name.
    run_name: str | None = None
    # CPU, memory, disk, network (and GPU when pynvml finds one) as system/* metrics every 10 s;
    # MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL changes the interval.
    system_metrics: bool = True
    # The trainer logs train metrics every this many steps.
    log_every_steps: int = 10
    # Make the new run a child of this MLflow run (tag mlflow.parentRunId): a sweep's runs under
    # one parent. `python -m cluster sweep` sets it; a resumed run keeps the parent it had.
    parent_run_id: str | None = None
    # At the end of a run: the prepared data as a dataset input, the model as a logged pyfunc model.
    log_dataset: bool = True
    log_model: bool = True

    def validate(self) -> None:
        """Reject values MLflow or the trainer cannot use."""
        if self.log_every_steps < 1:
            raise ConfigError("tracking.log_every_steps", f"got {self.log_every_steps}, expected >= 1")
        if not self.experiment.strip():
            raise ConfigError("tracking.experiment", "must be a non-empty experiment name")
        if self.tracking_uri is not None and not self.tracking_uri.strip():
            raise ConfigError(
                "tracking.tracking_uri", "is empty; remove the key (null) to use $MLFLOW_TRACKING_URI"
            )
        if self.run_name is not None and not self.run_name.strip():
            raise ConfigError("tracking.run_name", "is empty; remove the key (null) to use the run dir name")
        if self.parent_run_id is not None and not re.fullmatch(r"[0-9a-f]{32}", self.parent_run_id.strip()):
            raise ConfigError(
                "tracking.parent_run_id",
                f"got {self.parent_run_id!r}, expected a 32-hex MLflow run id or null",
            )


def _check_dict_name(name: str) -> None:
    if not name.endswith((".json", ".yaml", ".yml")):
        raise ValueError(f"log_dict: artifact name {name!r} must end with .json, .yaml or .yml")


def _check_status(status: str) -> None:
    if status not in RUN_STATUSES:
        raise ValueError(f"finish: status {status!r} is not one of {', '.join(RUN_STATUSES)}")


class Tracker(abc.ABC):
    """What the trainer calls; ``MLflowTracker`` on rank 0, ``NullTracker`` everywhere else.

    Both classes reject bad arguments the same way, so a coding mistake fails on every rank
    instead of on rank 0 alone (which would leave the other ranks waiting in a collective).
    """

    run_id: str | None = None

    @abc.abstractmethod
    def log_params(self, params: dict[str, Any]) -> None:
        """Record a (nested) config as flattened ``a.b.c`` params."""

    @abc.abstractmethod
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Record scalar metrics at ``step``."""

    @abc.abstractmethod
    def set_tags(self, tags: dict[str, str]) -> None:
        """Set (or overwrite) run tags."""

    @abc.abstractmethod
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a local file or directory into the run's artifacts (under ``artifact_path``)."""

    @abc.abstractmethod
    def log_dict(self, d: dict[str, Any], name: str) -> None:
        """Store ``d`` as the artifact ``name`` (``*.json``, or ``*.yaml``/``*.yml``)."""

    @abc.abstractmethod
    def log_figure_of_history(self) -> None:
        """Store a PNG of the loss and metric curves logged so far as ``plots/history.png``."""

    @abc.abstractmethod
    def finish(self, status: str = "FINISHED") -> None:
        """End the run with ``status`` (FINISHED, FAILED or KILLED)."""


class NullTracker(Tracker):
    """Does nothing: for ranks other than 0, disabled tracking, or an unreachable store."""

    def __init__(self) -> None:
        self.run_id = None
        self.history: dict[str, list[tuple[int, float]]] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        """No-op."""

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """No-op."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """No-op."""

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """No-op."""

    def log_dict(self, d: dict[str, Any], name: str) -> None:
        """No-op (the name is still checked)."""
        _check_dict_name(name)

    def log_figure_of_history(self) -> None:
        """No-op."""

    def finish(self, status: str = "FINISHED") -> None:
        """No-op (the status is still checked)."""
        _check_status(status)


def metric_key(name: str) -> str:
    """MLflow-safe metric name: ``eval/hr@10`` -> ``eval/hr_at_10``.

    MLflow accepts only letters, digits, ``_ - . : / `` and spaces in metric names; the ranking
    metrics' ``@K`` would be rejected, so ``@`` becomes ``_at_`` and anything else invalid ``_``.
    """
    return re.sub(r"[^/\w.\- :]", "_", name.replace("@", "_at_"))


def param_value(value: Any) -> str:
    """Stringify a config value for MLflow, truncated to MLflow's param length limit."""
    if isinstance(value, (list, tuple, dict)):
        text = json.dumps(value, default=str)
    else:
        text = str(value)
    if len(text) > MAX_PARAM_VALUE_LENGTH:
        text = text[: MAX_PARAM_VALUE_LENGTH - 3] + "..."
    return text


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def default_tags(world_size: int) -> dict[str, str]:
    """Tags that make a run reproducible and findable: code version, cluster, library versions."""
    tags = {"world_size": str(world_size), "hostname": socket.gethostname()}
    sha = _git("rev-parse", "HEAD")
    if sha:
        tags["git_sha"] = sha
        tags["mlflow.source.git.commit"] = sha  # shown by the MLflow UI
        # Uncommitted changes mean the sha alone does not reproduce the run.
        tags["git_dirty"] = str(bool(_git("status", "--porcelain", "--untracked-files=no"))).lower()
    if os.environ.get("SLURM_JOB_ID"):
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    for package in ("torch", "torchrec", "deepspeed", "fbgemm-gpu", "fbgemm-gpu-cpu", "mlflow"):
        try:
            tags[f"{package.replace('-', '_')}_version"] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return tags


def resolve_tracking_uri(cfg: TrackingConfig, default_uri: str) -> str:
    """``cfg.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``default_uri``."""
    return cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri


def _probe_http(uri: str) -> None:
    """Fail within seconds when nothing answers at ``uri`` (MLflow's own client would retry for minutes)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S):
            pass
    except urllib.error.HTTPError:
        return  # something answered; auth or path problems show up on the first real call
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, ssl.SSLError):
            return  # a TLS server answered; MLflow may trust it (MLFLOW_TRACKING_SERVER_CERT_PATH)
        raise ConnectionError(f"no answer from {uri} within {PROBE_TIMEOUT_S:.0f} s ({reason})") from None


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///path`` URI (None for other stores or in-memory SQLite)."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :])


class MLflowTracker(Tracker):
    """Logs one MLflow run through an explicit ``MlflowClient`` (no fluent global run)."""

    def __init__(self, cfg: TrackingConfig, *, run_dir: Path, tracking_uri: str):
        """Connect, then resume the run named in ``run_dir/mlflow_run_id`` or create a new one.

        Raises on an unreachable or unusable store; ``make_tracker`` turns that into a warning.
        """
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        # Process-wide, but only MLflow reads these, and this process has one tracker.
        for key, value in HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(key, value)
        if tracking_uri.startswith(("http://", "https://")):
            _probe_http(tracking_uri)
        db_path = _sqlite_path(tracking_uri)
        if db_path is not None:
            db_path.parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        # Metric name -> [(step, value)], for the history figure; includes earlier attempts on resume.
        self.history: dict[str, list[tuple[int, float]]] = {}
        self._params: dict[str, str] = {}  # params already in the run (immutable in MLflow)
        self._pending: list[Any] = []  # mlflow Metric objects the store has not accepted yet
        self._failed_at: float | None = None
        self._warned = False
        self._finished = False
        self._monitor = None

        run_dir.mkdir(parents=True, exist_ok=True)
        run_id = self._resume_run(run_dir)
        resumed = run_id is not None
        if run_id is None:
            run_id = self._create_run(cfg, run_dir)
        self.run_id = run_id
        if cfg.system_metrics:
            self._start_system_metrics(resumed)

    def _resume_run(self, run_dir: Path) -> str | None:
        """Reopen the run recorded in ``run_dir``; None when there is none to continue."""
        from mlflow.exceptions import MlflowException

        id_file = run_dir / RUN_ID_FILE
        if not id_file.is_file():
            return None
        run_id = id_file.read_text().strip()
        try:
            run = self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            logger.warning(
                "%s names MLflow run %s, which the store %s does not hold (was the tracking URI changed?); "
                "starting a new run",
                id_file,
                run_id,
                self.tracking_uri,
            )
            return None
        if run.info.lifecycle_stage == "deleted":
            logger.warning("MLflow run %s from %s was deleted; starting a new run", run_id, id_file)
            return None
        self.client.update_run(run_id, status="RUNNING")
        self._params = dict(run.data.params)
        for key in run.data.metrics:
            if not key.startswith(SYSTEM_METRICS_PREFIX):
                points = self.client.get_metric_history(run_id, key)
                self.history[key] = sorted((m.step, m.value) for m in points)
        logger.info("Resuming MLflow run %s in %s", run_id, self.tracking_uri)
        return run_id

    def _create_run(self, cfg: TrackingConfig, run_dir: Path) -> str:
        experiment_id = self._experiment_id(cfg.experiment)
        tags = {"mlflow.source.name": Path(sys.argv[0]).name or "python", "run_dir": str(run_dir.resolve())}
        try:
            tags["mlflow.user"] = getpass.getuser()
        except (KeyError, OSError):  # containers without a passwd entry
            pass
        if cfg.parent_run_id:
            tags["mlflow.parentRunId"] = cfg.parent_run_id.strip()  # how the MLflow UI nests runs
        run = self.client.create_run(experiment_id, run_name=cfg.run_name or run_dir.name, tags=tags)
        run_id = run.info.run_id
        # Written atomically: a job killed mid-write must not leave a half id for the restart.
        tmp = run_dir / (RUN_ID_FILE + ".tmp")
        tmp.write_text(run_id + "\n")
        os.replace(tmp, run_dir / RUN_ID_FILE)
        logger.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.experiment, self.tracking_uri)
        return run_id

    def _experiment_id(self, name: str) -> str:
        """Id of experiment ``name``, created when missing (artifacts next to an SQLite store)."""
        from mlflow.exceptions import MlflowException

        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            if experiment.lifecycle_stage == "deleted":
                raise ValueError(
                    f"MLflow experiment '{name}' at {self.tracking_uri} is deleted; restore it "
                    f"(mlflow experiments restore --experiment-id {experiment.experiment_id}) or set "
                    "tracking.experiment=<another name>"
                )
            return experiment.experiment_id
        artifact_location = None
        db_path = _sqlite_path(self.tracking_uri)
        if db_path is not None:
            # MLflow's default is ./mlruns relative to the current directory, which differs per job.
            safe_name = re.sub(r"[^\w.-]", "_", name)
            artifact_location = (db_path.parent / "mlartifacts" / safe_name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            # Another job may have created it between our lookup and our create.
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _start_system_metrics(self, resumed: bool) -> None:
        # SystemMetricsMonitor is what mlflow.start_run(log_system_metrics=True) uses; driving it
        # directly keeps the explicit client (no fluent active run). It logs from a daemon thread.
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(
                self.run_id, resume_logging=resumed, tracking_uri=self.tracking_uri
            )
            self._monitor.start()
        except Exception as exc:
            self._monitor = None
            logger.warning(
                "MLflow system metrics are off for run %s (%s: %s); needs psutil (and pynvml for GPUs)",
                self.run_id,
                type(exc).__name__,
                exc,
            )

    def _call(self, what: str, fn: Callable[[], None]) -> bool:
        """Run one store operation; on failure warn once and pause logging instead of raising."""
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_AFTER_S:
            return False
        try:
            fn()
        except Exception as exc:
            self._failed_at = time.monotonic()
            if not self._warned:
                self._warned = True
                logger.warning(
                    "MLflow %s failed for run %s at %s (%s: %s). Training goes on; logging pauses and is "
                    "retried every %.0f s (metrics are kept and sent then, params/tags/artifacts are "
                    "dropped meanwhile). Check that the tracking server is up and reachable.",
                    what,
                    self.run_id,
                    self.tracking_uri,
                    type(exc).__name__,
                    exc,
                    RETRY_AFTER_S,
                )
            return False
        if self._failed_at is not None:
            logger.warning("MLflow at %s answers again; logging resumed", self.tracking_uri)
            self._failed_at = None
            self._warned = False
        return True

    def _send_pending_metrics(self) -> None:
        while self._pending:
            chunk = self._pending[:MAX_METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=chunk)
            del self._pending[: len(chunk)]  # keep what is left if a later chunk fails

    def log_params(self, params: dict[str, Any]) -> None:
        """Flatten, stringify (truncated to 6000 chars) and send in batches of 100.

        Params are immutable in MLflow: a resumed run keeps its first values, and a key whose value
        changed since is reported in a warning instead of being sent.
        """
        from mlflow.entities import Param

        if dataclasses.is_dataclass(params) and not isinstance(params, type):
            params = dataclasses.asdict(params)
        values = {key: param_value(value) for key, value in flatten(params).items()}
        changed = sorted(k for k, v in values.items() if k in self._params and self._params[k] != v)
        if changed:
            logger.warning(
                "MLflow run %s already has different values for %s (params cannot change); the new "
                "values are in the run's config artifact only",
                self.run_id,
                ", ".join(f"{k} ({self._params[k]!r} -> {values[k]!r})" for k in changed[:10]),
            )
        new = [Param(k, v) for k, v in values.items() if k not in self._params]

        def send() -> None:
            for start in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
                chunk = new[start : start + MAX_PARAMS_TAGS_PER_BATCH]
                self.client.log_batch(self.run_id, params=chunk)
                self._params.update((p.key, p.value) for p in chunk)

        self._call("log_params", send)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Send the metrics (names made MLflow-safe by ``metric_key``) as one batch."""
        from mlflow.entities import Metric

        timestamp_ms = int(time.time() * 1000)
        for name, value in metrics.items():
            key = metric_key(name)
            value = float(value)  # also takes 0-dim tensors and numpy scalars
            self.history.setdefault(key, []).append((int(step), value))
            self._pending.append(Metric(key, value, timestamp_ms, int(step)))
        if len(self._pending) > MAX_PENDING_METRICS:
            del self._pending[: len(self._pending) - MAX_PENDING_METRICS]
        self._call("log_metrics", self._send_pending_metrics)

    def set_tags(self, tags: dict[str, str]) -> None:
        """Send tags (values stringified and truncated to 8000 chars) in batches of 100."""
        from mlflow.entities import RunTag

        entries = [RunTag(str(k), str(v)[:MAX_TAG_VALUE_LENGTH]) for k, v in tags.items()]

        def send() -> None:
            for start in range(0, len(entries), MAX_PARAMS_TAGS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=entries[start : start + MAX_PARAMS_TAGS_PER_BATCH])

        self._call("set_tags", send)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Upload a file (or a directory's files) into the run, under ``artifact_path``.

        A missing path gets a warning, not an exception: only rank 0 gets here, and an exception on
        one rank would stall the others.
        """
        path = Path(path)
        if not path.exists():
            logger.warning("MLflow log_artifact: %s does not exist; nothing uploaded", path)
            return
        if path.is_dir():
            self._call(
                "log_artifacts", lambda: self.client.log_artifacts(self.run_id, str(path), artifact_path)
            )
        else:
            self._call(
                "log_artifact", lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)
            )

    def log_dict(self, d: dict[str, Any], name: str) -> None:
        """Store ``d`` as JSON or YAML (chosen by the extension of ``name``)."""
        _check_dict_name(name)
        self._call("log_dict", lambda: self.client.log_dict(self.run_id, d, name))

    def log_figure_of_history(self) -> None:
        """Plot every non-system metric logged so far into ``plots/history.png`` in the run."""
        from train.plots import plot_history

        if not self.history:
            logger.info("No metrics logged yet; skipping the history figure")
            return

        def send() -> None:
            with tempfile.TemporaryDirectory() as tmp:
                png = plot_history(self.history, Path(tmp) / "history.png")
                self.client.log_artifact(self.run_id, str(png), "plots")

        self._call("log_figure_of_history", send)

    def finish(self, status: str = "FINISHED") -> None:
        """Stop system metrics, send what is pending and end the run; later calls do nothing."""
        _check_status(status)
        if self._finished:
            return
        self._finished = True
        if self._monitor is not None:
            self._monitor.finish()  # joins its thread and flushes the last system metrics
            self._monitor = None
        self._failed_at = None  # one last attempt even during a pause
        self._call("log_metrics", self._send_pending_metrics)
        self._call("finish", lambda: self.client.set_terminated(self.run_id, status))


def make_tracker(cfg: TrackingConfig, *, rank: int, run_dir: Path, default_uri: str) -> Tracker:
    """``MLflowTracker`` on global rank 0 (when enabled and reachable), else ``NullTracker``.

    ``default_uri`` is used when neither the config nor ``$MLFLOW_TRACKING_URI`` names a store; the
    trainer passes ``sqlite:///<abs output_root>/mlflow.db``.
    """
    if rank != 0 or not cfg.enabled:
        return NullTracker()
    uri = resolve_tracking_uri(cfg, default_uri)
    try:
        return MLflowTracker(cfg, run_dir=Path(run_dir), tracking_uri=uri)
    except Exception as exc:
        logger.warning(
            "MLflow tracking at %s could not start (%s: %s). Training continues WITHOUT experiment "
            "tracking. To fix: start the tracking server, or point tracking.tracking_uri (or "
            "MLFLOW_TRACKING_URI) at a reachable one; tracking.enabled=false silences this.",
            uri,
            type(exc).__name__,
            exc,
        )
        return NullTracker()


def dataset_profile(manifest: dict) -> dict:
    """The deterministic summary of a prepared data set: counts and each data file's sha256."""
    return {
        "num_users": manifest.get("num_users"),
        "num_items": manifest.get("num_items"),
        "num_interactions": manifest.get("num_interactions"),
        "splits": {
            name: {
                "num_rows": split.get("num_rows"),
                "files": {f["path"]: f["sha256"] for f in split["files"]},
            }
            for name, split in sorted(manifest.get("splits", {}).items())
        },
        "input_fingerprint": manifest.get("input_fingerprint"),
        "inputs": [{"path": f.get("path"), "sha256": f.get("sha256")} for f in manifest.get("inputs", [])],
    }


def log_dataset_input(
    tracker: Tracker, data_dir: str | os.PathLike, manifest: dict, context: str = "training"
) -> None:
    """Record the prepared data as the run's MLflow dataset input (``mlflow.data``, ``log_inputs``).

    The source is the prepared directory; the digest is a hash of the profile (counts and file
    checksums), so two runs on byte-identical data show the same dataset in the MLflow UI.
    No-op on a ``NullTracker``.
    """
    if not isinstance(tracker, MLflowTracker):
        return
    import hashlib
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag

    profile = dataset_profile(manifest)
    digest = hashlib.sha256(json.dumps(profile, sort_keys=True).encode()).hexdigest()[:16]

    class PreparedDataset(MetaDataset):
        @property
        def profile(self):
            return profile

        def to_dict(self) -> dict[str, str]:
            return {**super().to_dict(), "profile": json.dumps(profile)}  # MetaDataset leaves it out

    def send() -> None:
        path = Path(data_dir).resolve()
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are the local source
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        entity = PreparedDataset(source, name=path.name, digest=digest)._to_mlflow_entity()
        tags = [InputTag("mlflow.data.context", context)]
        tracker.client.log_inputs(tracker.run_id, [DatasetInput(entity, tags)])

    tracker._call("log_inputs", send)


@contextlib.contextmanager
def global_tracking_uri(uri: str):
    """Point MLflow's process-wide tracking URI at ``uri`` for a block, then restore it exactly.

    ``mlflow.set_tracking_uri`` also exports MLFLOW_TRACKING_URI for subprocesses; restoring "unset"
    (None) removes it again, so nothing started later inherits this store by accident.
    """
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def recommender_signature():
    """The pyfunc's interface: ``history`` (raw ids), optional times, param ``k`` (default 10)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    inputs = Schema(
        [
            ColSpec(Array(DataType.string), "history"),
            ColSpec(Array(DataType.long), "timestamps", required=False),
            ColSpec(DataType.long, "query_timestamp", required=False),
        ]
    )
    outputs = Schema([ColSpec(Array(DataType.string), "top_item_ids")])
    return ModelSignature(
        inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", DataType.long, 10)])
    )


def log_recommender_model(
    tracker: Tracker, *, encoder, item_table_ID, config_path: str | os.PathLike, data_dir: str | os.PathLike
) -> str | None:
    """Log the trained model as an MLflow logged model (pyfunc ``train.serving.SequenceRecommender``).

    ``encoder`` is a plain (unsharded, full-parameter) copy of the dense encoder, ``item_table_ID`` the
    gathered raw item table, ``config_path`` the run's resolved config. Returns the model URI
    (``models:/<id>``), or None on a ``NullTracker`` or when MLflow refused (warned, as any logging).
    """
    if not isinstance(tracker, MLflowTracker):
        return None
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import Model

    result: list[str] = []

    def send() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            state = {k: v.detach().float().cpu() for k, v in encoder.state_dict().items()}
            torch.save(state, tmp / "encoder.pt")
            np.save(tmp / "item_table.npy", item_table_ID.detach().float().cpu().numpy())
            artifacts = {
                "config": str(config_path),
                "encoder": str(tmp / "encoder.pt"),
                "item_table": str(tmp / "item_table.npy"),
                "items": str(Path(data_dir) / "vocab" / "items.parquet"),
            }
            # Created here so it lands in the run's experiment (Model.log alone would use the default one).
            experiment_id = tracker.client.get_run(tracker.run_id).info.experiment_id
            logged = tracker.client.create_logged_model(
                experiment_id, name="model", source_run_id=tracker.run_id
            )
            with global_tracking_uri(tracker.tracking_uri):  # Model.log resolves the store globally
                info = Model.log(
                    model_id=logged.model_id,
                    artifact_path=None,
                    name="model",
                    flavor=mlflow.pyfunc,
                    run_id=tracker.run_id,
                    python_model=str(PROJECT_ROOT / "train" / "serving.py"),  # models from code: no pickle
                    artifacts=artifacts,
                    signature=recommender_signature(),
                    code_paths=[str(PROJECT_ROOT / "train"), str(PROJECT_ROOT / "cluster")],
                )
            result.append(info.model_uri)

    tracker._call("log_model", send)
    return result[0] if result else None
