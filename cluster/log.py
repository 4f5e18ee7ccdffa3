"""Logging, set up once per process.

Call ``setup_logging()`` at the top of every entry point; library modules only do
``logger = logging.getLogger(__name__)``. In a multi-process job every line carries the rank, and
ranks other than 0 log warnings and errors only (set ``GENREC_LOG_ALL_RANKS=1`` to see them all).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

_configured = False
# Libraries whose INFO lines (kernel loading, per-table optimizer dumps) drown the training log.
_QUIET_PATHS = ("/fbgemm_gpu/", "/torchrec/distributed/", "/deepspeed/")


class _QuietLibraries(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(p in record.pathname for p in _QUIET_PATHS)


def setup_logging(level: str | None = None) -> None:
    global _configured
    if _configured:
        return
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    level = level or os.environ.get("GENREC_LOG_LEVEL", "INFO")
    if rank != 0 and os.environ.get("GENREC_LOG_ALL_RANKS") != "1":
        level = "WARNING"
    tag = f"[rank{rank}] " if world > 1 else ""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_QuietLibraries())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s", "%H:%M:%S")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("urllib3", "filelock", "matplotlib", "alembic", "numexpr"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # TorchRec's data_parallel kernel calls an fbgemm op without an autograd registration; torch warns
    # on every process, yet the gradient is right (tests/test_trainer.py compares it with the unsharded run).
    warnings.filterwarnings(
        "ignore", message=r"fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel"
    )
    _configured = True
