"""Where this process runs: under torchrun, as a task of a Slurm step, or as a plain process.

``detect()`` reads the environment once and returns one ``ClusterEnv`` (rank, local rank, world size,
node count, rendezvous address) whichever launcher started the process:

* torchrun (also ``srun torchrun`` in slurm/train.sbatch): RANK, LOCAL_RANK, WORLD_SIZE,
  LOCAL_WORLD_SIZE, GROUP_WORLD_SIZE (nodes), MASTER_ADDR/MASTER_PORT, all set by the agent.
* a Slurm step without torchrun (``srun -n 8 python -m train``): SLURM_PROCID, SLURM_LOCALID,
  SLURM_STEP_NUM_TASKS, SLURM_STEP_NUM_NODES; the rendezvous is the step's first node (from
  SLURM_STEP_NODELIST) on MASTER_PORT, else a port derived from the job id. The batch script itself
  (no SLURM_STEP_ID) is not a step: it is a plain process.
* anything else: one process, rank 0 of 1, on 127.0.0.1 and a free port.

``ClusterEnv.export()`` writes the RANK/WORLD_SIZE/MASTER_* variables torch's ``env://`` init reads.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass

# Slurm steps without MASTER_PORT use BASE + job id % SPAN: distinct for jobs sharing a node.
SLURM_PORT_BASE = 20000
SLURM_PORT_SPAN = 10000


@dataclass(frozen=True)
class ClusterEnv:
    """One view of the launch, whatever started this process."""

    launcher: str  # "torchrun", "slurm" or "local"
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    num_nodes: int
    node_rank: int
    master_addr: str
    master_port: int
    job_id: str | None = None  # Slurm job id when inside a Slurm allocation

    def export(self, environ: dict | None = None) -> None:
        """Set RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT (``env://``)."""
        target = os.environ if environ is None else environ
        target.update(
            RANK=str(self.rank),
            LOCAL_RANK=str(self.local_rank),
            WORLD_SIZE=str(self.world_size),
            LOCAL_WORLD_SIZE=str(self.local_world_size),
            MASTER_ADDR=self.master_addr,
            MASTER_PORT=str(self.master_port),
        )

    def describe(self) -> str:
        """One line for the log."""
        where = f", Slurm job {self.job_id}" if self.job_id else ""
        return (
            f"{self.launcher}: rank {self.rank}/{self.world_size} (local {self.local_rank}/"
            f"{self.local_world_size}, node {self.node_rank}/{self.num_nodes}), rendezvous "
            f"{self.master_addr}:{self.master_port}{where}"
        )


def first_host(nodelist: str) -> str:
    """The first host of a Slurm hostlist: ``gpu[03-05,09],cpu1`` -> ``gpu03``.

    The same answer as ``scontrol show hostnames LIST | head -1``, without needing scontrol here.
    """
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("empty Slurm node list")
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if match is None:
        raise ValueError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]  # zero padding is kept: "03" stays "03"
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError):
        raise ValueError(f"environment variable {key}={env.get(key)!r}: expected an integer") from None


def detect(environ: Mapping[str, str] | None = None) -> ClusterEnv:
    """Read the launch environment (``os.environ`` unless given); see the module docstring."""
    env = os.environ if environ is None else environ
    job_id = env.get("SLURM_JOB_ID")
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, or anything else speaking env://
        world = _int(env, "WORLD_SIZE")
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return ClusterEnv(
            launcher="torchrun" if "TORCHELASTIC_RUN_ID" in env else "env",
            rank=_int(env, "RANK"),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            world_size=world,
            local_world_size=local_world,
            num_nodes=int(env.get("GROUP_WORLD_SIZE", max(1, world // max(1, local_world)))),
            node_rank=int(env.get("GROUP_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            job_id=job_id,
        )
    if "SLURM_STEP_ID" in env and "SLURM_PROCID" in env:  # one task per rank, started by srun
        world = int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")))
        num_nodes = int(env.get("SLURM_STEP_NUM_NODES", env.get("SLURM_NNODES", "1")))
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:
            port = SLURM_PORT_BASE + int(job_id or 0) % SLURM_PORT_SPAN
        tasks_per_node = env.get("SLURM_STEP_TASKS_PER_NODE", "").split("(")[0].split(",")[0]
        return ClusterEnv(
            launcher="slurm",
            rank=_int(env, "SLURM_PROCID"),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            world_size=world,
            local_world_size=int(tasks_per_node) if tasks_per_node.isdigit() else max(1, world // num_nodes),
            num_nodes=num_nodes,
            node_rank=int(env.get("SLURM_NODEID", 0)),
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=port,
            job_id=job_id,
        )
    return ClusterEnv(
        launcher="local",
        rank=0,
        local_rank=0,
        world_size=1,
        local_world_size=1,
        num_nodes=1,
        node_rank=0,
        master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
        master_port=int(env["MASTER_PORT"]) if "MASTER_PORT" in env else _free_port(),
        job_id=job_id,
    )
