"""One job per output directory: two jobs writing the same checkpoints would corrupt each other's.

Rank 0 takes an exclusive ``fcntl.flock`` on ``<output_dir>/.lock`` for the life of the run and
writes its holder (Slurm job id, host, pid, start time) into the file. A second job pointed at the
same directory finds the lock taken and refuses to start with a message naming the holder; every
rank of it raises the same error (the answer is all-reduced), so none is left waiting in a
collective. The kernel releases the lock when the holding process exits, however it exits, so a
crashed or killed job never leaves a stale lock behind (the holder text stays, and is overwritten).
A requeued job starts after its first attempt has ended and takes the lock again.

Filesystems: flock works on local disks and on NFSv4 (Linux maps it onto NFS byte-range locks);
Lustre needs the ``flock`` mount option, without which ``flock`` raises and the run stops with the
reason.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist

LOCK_NAME = ".lock"


class RunDirLocked(ValueError):
    """Another live process holds the output directory's lock."""


class RunLock:
    """An exclusive lock on ``<output_dir>/.lock``, held until ``release()`` or process exit."""

    def __init__(self, output_dir: str | os.PathLike):
        self.path = Path(output_dir) / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``RunDirLocked`` naming the holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "(no holder written yet)"
            os.close(fd)
            raise RunDirLocked(
                f"run.output_dir {self.path.parent} is in use by another job ({holder}); two jobs writing "
                "one directory would corrupt its checkpoints. Wait for it to end (or cancel it), or point "
                "run.output_dir at another directory."
            ) from None
        except OSError:
            os.close(fd)
            raise
        holder = {
            "job_id": os.environ.get("SLURM_JOB_ID"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the holder text stays; the next holder overwrites it)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def acquire_run_lock(output_dir: str | os.PathLike, is_main: bool, device: torch.device) -> RunLock | None:
    """Collective: rank 0 locks ``output_dir``; every rank raises ``RunDirLocked`` if that failed.

    Returns the lock on rank 0 (keep a reference for the run), None on the other ranks.
    """
    lock, error = None, ""
    if is_main:
        lock = RunLock(output_dir)
        try:
            lock.acquire()
        except (RunDirLocked, OSError) as exc:
            lock, error = None, str(exc)
    failed = torch.tensor([1.0 if error else 0.0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item() > 0:
        raise RunDirLocked(error or f"rank 0 could not lock run.output_dir {output_dir} (see its log)")
    return lock
