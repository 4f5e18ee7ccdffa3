"""Process-group setup: the same code on CPU (gloo) and CUDA (nccl), under torchrun or alone.

``init_distributed()`` asks ``cluster.env.detect()`` where it runs: under torchrun (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT), as a task of a Slurm step (``srun python -m train``:
SLURM_PROCID, SLURM_STEP_NUM_TASKS, the step's first node), or as a plain ``python -m train``, which
gets a one-process group on a free local port; the rest of the trainer never branches on
"distributed or not".
"""

from __future__ import annotations

import datetime
import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cluster.env import detect

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    num_nodes: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: float = 30.0) -> DistInfo:
    """Initialise (or reuse) the default process group; nccl when CUDA is available, else gloo."""
    env = detect()
    env.export()  # torch's env:// init reads RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    if env.rank == 0:
        log.info("launch: %s", env.describe())
    local_rank = env.local_rank
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend(), env.num_nodes
    )


def destroy_distributed() -> None:
    """Tear the process group down while the interpreter is still fully alive.

    Drop every object holding the group (the trainer, sharded modules) before calling this. Modules
    sit in reference cycles, so without the collection here the group is freed only by the garbage
    collector during interpreter shutdown; a gloo worker thread still releasing a just-finished
    collective's tensors then needs the GIL that shutdown no longer hands out, and the process
    aborts ("terminate called without an active exception"). Freed here, the group joins its threads.
    """
    if dist.is_initialized():
        ds_comm = sys.modules.get("deepspeed.comm")
        if ds_comm is not None and ds_comm.is_initialized():
            ds_comm.destroy_process_group()  # also drops DeepSpeed's own references to the groups
        else:
            dist.destroy_process_group()
    gc.collect()
    if left := live_gloo_threads(
        wait_s=2.0
    ):  # known case: DeepSpeed ZeRO-3 keeps its engine (and groups) alive
        log.info("%s %d left: something still holds a process group; a collective finishing during "
                 "interpreter shutdown could abort the process", GLOO_THREADS_LEFT, len(left))  # fmt: skip


GLOO_THREADS_LEFT = "gloo threads outlive the process groups:"


def live_gloo_threads(wait_s: float = 0.0) -> list[str]:
    """Names of this process's gloo threads (read from /proc on Linux; empty elsewhere).

    With ``wait_s``, polls until none is left or the time is up: a freed group's last reference can
    be dropped on one of gloo's own threads, which then joins the transport loop a moment later.
    """
    deadline = time.monotonic() + wait_s
    while (left := _gloo_threads()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _gloo_threads() -> list[str]:
    tasks = Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else []:
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return [n for n in names if "gloo" in n]


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few scalars over ranks in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
