"""A real single-node Slurm on this machine, for the Slurm tests and for a dev box.

    sudo python -m cluster.local_slurm start    # install (apt) if missing, configure, start, wait idle
    export SLURM_CONF=/var/tmp/genrec-slurm/slurm.conf   # printed by start; sbatch/squeue need it
    sudo python -m cluster.local_slurm status
    sudo python -m cluster.local_slurm stop     # cancel jobs, stop slurmd, slurmctld, munged

It needs root (apt-get, munged, slurmd) and Debian/Ubuntu packages ``slurmctld slurmd munge
slurm-client``. The configuration is the smallest that runs real jobs without systemd or cgroups:
``ProctrackType=proctrack/linuxproc`` (tracks job processes by parent pid), ``TaskPlugin=task/none``,
CPUs scheduled as consumable resources (``CR_CPU``; memory is not), one partition ``debug`` holding
this host. Everything the daemons write (config, state, logs, pid files) lives in one state directory
(``/var/tmp/genrec-slurm`` unless ``--state-dir``/``$GENREC_SLURM_DIR``), so ``stop`` followed by
deleting it leaves nothing behind. The daemons run as root, like the jobs they start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path(os.environ.get("GENREC_SLURM_DIR", "/var/tmp/genrec-slurm"))
PACKAGES = ["slurmctld", "slurmd", "munge", "slurm-client"]
MUNGE_RUN_DIR = Path("/run/munge")


class SlurmUnavailable(RuntimeError):
    """Slurm could not be installed or started here; the message says why."""


@dataclass
class LocalSlurm:
    """Paths of one local Slurm; ``env()`` is what a client command (sbatch, squeue) needs."""

    state_dir: Path = DEFAULT_STATE_DIR
    node: str = ""
    cpus: int = 0

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir)
        self.node = self.node or socket.gethostname().split(".")[0]
        self.cpus = self.cpus or (os.cpu_count() or 1)

    @property
    def conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    def env(self) -> dict[str, str]:
        """``os.environ`` plus ``SLURM_CONF`` pointing at this cluster's config."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster; returns the finished process."""
        proc = subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    # ------------------------------------------------------------------------------------ install

    def install(self) -> None:
        """apt-get install the Slurm and munge packages when a daemon is missing."""
        if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
            return
        if os.geteuid() != 0:
            raise SlurmUnavailable("Slurm is not installed and installing it needs root (apt-get)")
        if not shutil.which("apt-get"):
            raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", *PACKAGES]):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if proc.returncode != 0:
                raise SlurmUnavailable(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-2000:]}")

    # ------------------------------------------------------------------------------------ config

    def write_config(self) -> None:
        """Write slurm.conf for this host (CPUs, memory) into the state directory."""
        for sub in ("state", "spool", "log"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        mem_mib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        d = self.state_dir
        self.conf.write_text(
            f"""# Written by cluster/local_slurm.py: a single-node Slurm for tests and dev boxes.
ClusterName=genrec
SlurmctldHost={self.node}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# Look for startable jobs every 2 s instead of every 60 s: a requeued job restarts promptly.
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
# Finished jobs stay visible to squeue/scontrol for 10 minutes.
MinJobAge=600
KillWait=10
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
NodeName={self.node} CPUs={self.cpus} RealMemory={mem_mib} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    # ------------------------------------------------------------------------------ start / stop

    def _pid(self, name: str) -> int | None:
        path = MUNGE_RUN_DIR / "munged.pid" if name == "munged" else self.state_dir / f"{name}.pid"
        try:
            pid = int(path.read_text().strip())
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError):
            return None

    def _start_munge(self) -> None:
        if self._pid("munged"):
            return
        MUNGE_RUN_DIR.mkdir(parents=True, exist_ok=True)
        shutil.chown(MUNGE_RUN_DIR, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.is_file():  # packages normally create it; a fresh key is fine for one node
            subprocess.run(["mungekey", "--create"], check=True, capture_output=True)
            shutil.chown(key, "munge", "munge")
        # munged refuses to run as root; the package's service runs it as the munge user.
        self._check(["runuser", "-u", "munge", "--", "munged"], "munged")

    def _check(self, cmd: list[str], what: str) -> None:
        proc = subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{what} did not start ({proc.returncode}): {proc.stderr.strip()[-1500:]}")

    def start(self, timeout_s: float = 60) -> None:
        """Install when missing, configure, start munged, slurmctld, slurmd; wait until the node is idle."""
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting a local Slurm needs root (munged, slurmd)")
        self.install()
        self.write_config()
        self._start_munge()
        if not self._pid("slurmctld"):
            # -i: ignore state from an earlier cluster in this directory that no longer matches.
            self._check(["slurmctld", "-f", str(self.conf), "-i"], "slurmctld")
        if not self._pid("slurmd"):
            self._check(["slurmd", "-f", str(self.conf), "-N", self.node], "slurmd")
        deadline = time.monotonic() + timeout_s
        state = ""
        while time.monotonic() < deadline:
            proc = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", check=False)
            state = proc.stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        log = self.state_dir / "log" / "slurmctld.log"
        tail = log.read_text()[-1500:] if log.is_file() else "(no log)"
        raise SlurmUnavailable(
            f"node {self.node} is {state!r}, not idle, after {timeout_s:.0f} s; {log}:\n{tail}"
        )

    def stop(self) -> None:
        """Cancel every job, then stop slurmd, slurmctld and munged (those this state dir started)."""
        if self._pid("slurmctld"):
            self.run("scancel", "--full", "--user", "root", check=False)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self._pid(name)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and self._pid(name):
                time.sleep(0.2)
            if self._pid(name):
                os.kill(pid, signal.SIGKILL)

    def status(self) -> str:
        """One line per daemon with its pid, then sinfo."""
        lines = [f"{name}: {self._pid(name) or 'not running'}" for name in ("munged", "slurmctld", "slurmd")]
        if self._pid("slurmctld"):
            lines.append(self.run("sinfo", check=False).stdout.strip())
        return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m cluster.local_slurm {start,stop,status} [--state-dir DIR]``."""
    parser = argparse.ArgumentParser(prog="python -m cluster.local_slurm", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    args = parser.parse_args(argv)
    slurm = LocalSlurm(args.state_dir)
    try:
        if args.action == "start":
            t0 = time.perf_counter()
            slurm.start()
            print(
                f"Slurm is up in {time.perf_counter() - t0:.1f} s. Use it with:\n  export SLURM_CONF={slurm.conf}"
            )
        elif args.action == "stop":
            slurm.stop()
        else:
            print(slurm.status())
    except SlurmUnavailable as exc:
        print(f"local Slurm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
