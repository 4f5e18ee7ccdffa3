"""Stop at a step boundary when Slurm warns that the job's time is up (or that it is preempted).

Who gets the signal. ``slurm/train.sbatch`` asks for ``--signal=B:USR1@<seconds>``: only the batch
shell gets SIGUSR1. Its trap forwards it to the training step (``scancel --signal=USR1 JOBID``), where
Slurm signals *every* process of the step: the torchrun agents and their workers alike. torchrun's
agent does not handle SIGUSR1 (its handled set, ``--signals-to-handle``, is SIGTERM, SIGINT, SIGHUP,
SIGQUIT by default, and a handled signal makes it tear the workers down), so the default action would
kill the agent and orphan its workers. The agent is therefore started through ``python -m
cluster.torchrun``, which ignores SIGUSR1 and then runs torchrun unchanged; the workers inherit the
ignore until the trainer installs its handler (``PreemptionHandler.install``).

What the trainer does. The handler only sets a flag. At each step boundary every rank calls
``should_stop()``, a MAX all_reduce of the flag, so all ranks stop after the same step even when the
signal reached them at different moments (or only some of them). The trainer then saves a
checkpoint, writes the stop marker (``mark_stopped``) and returns; the batch shell sees the marker and
runs ``scontrol requeue $SLURM_JOB_ID``. The requeued job resumes from that checkpoint
(``run.resume=auto``) into the same MLflow run (``<output_dir>/mlflow_run_id``). Because the resume
is exact at step boundaries, the final metrics equal an uninterrupted run's.

The marker is a file named by ``$GENREC_STOP_MARKER`` (the sbatch file sets it; unset: no marker),
holding the step. A file rather than an exit code, because torchrun reports any worker failure as its
own exit code 1, and a clean exit keeps the MLflow run and the logs free of a fake failure.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

STOP_MARKER_ENV = "GENREC_STOP_MARKER"
STOP_SIGNALS = (signal.SIGUSR1,)


class PreemptionHandler:
    """A flag set by SIGUSR1, agreed on by all ranks at step boundaries."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def install(self) -> PreemptionHandler:
        """Catch SIGUSR1 in this (main) thread; returns self."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame) -> None:
        # Only set a flag: the step in flight may be inside a collective, which must finish everywhere.
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on every rank when any rank has been signalled."""
        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item() > 0)
        if stop and not self.requested:
            logger.info("another rank was signalled: stopping at this step boundary")
        self.requested = self.requested or stop
        return stop


def mark_stopped(step: int, output_dir: str | os.PathLike, is_main: bool) -> Path | None:
    """Write the stop marker (``$GENREC_STOP_MARKER``) on rank 0 after the checkpoint is saved.

    The batch script requeues the job only when this file exists, so a signal that arrives after the
    last step (the run then finishes normally) does not start a pointless second job.
    """
    path = os.environ.get(STOP_MARKER_ENV)
    logger.info("stopped at step %d on a pre-timeout signal; checkpoint saved, resume=auto continues", step)
    if not path or not is_main:
        return None
    marker = Path(path)
    marker.parent.mkdir(parents=True, exist_ok=True)
    info = {
        "step": step,
        "output_dir": str(Path(output_dir).resolve()),
        "job_id": os.environ.get("SLURM_JOB_ID"),
        "host": socket.gethostname(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps(info) + "\n")
    os.replace(tmp, marker)
    return marker
