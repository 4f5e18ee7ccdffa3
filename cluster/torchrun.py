"""torchrun whose agent survives SIGUSR1: ``python -m cluster.torchrun [torchrun args]``.

Slurm's pre-timeout signal goes to every process of a job step, the torchrun agent included, and the
agent neither handles nor ignores SIGUSR1, so it would die of it. This ignores SIGUSR1 in the agent
and then runs ``torch.distributed.run`` with the same arguments. The workers inherit the ignore until
the trainer installs its own handler (cluster/preemption.py): a signal arriving during start-up is
harmless, but lost (the job then runs until its time limit).
"""

from __future__ import annotations

import signal
import sys


def main() -> None:
    """Ignore SIGUSR1, then hand over to torchrun."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    from torch.distributed.run import main as torchrun_main

    sys.argv[0] = "torchrun"
    torchrun_main()


if __name__ == "__main__":
    main()
