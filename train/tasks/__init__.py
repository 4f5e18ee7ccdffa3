"""Model families on the shared trainer, chosen by ``model.name`` (see ``train/tasks/base.py``).

    task = build_task(cfg, info, manifest)

==========  ====================================================================
model.name  task
==========  ====================================================================
hstu        ``RetrievalTask``: item table + HSTU encoder, softmax over items
sasrec      ``RetrievalTask``: item table + SASRec encoder, softmax over items
gru4rec     ``RetrievalTask``: item table + GRU encoder, softmax over items
bert4rec    ``Bert4RecTask``: item table with a mask row + bidirectional encoder, cloze softmax
tiger       ``TigerTask``: token table + T5 encoder-decoder, beam search over semantic IDs
==========  ====================================================================

A new family adds its config dataclass to ``train/models/config.py`` (``ModelConfig.choices``) and
its task class here; the trainer, the reader and the evaluation do not change.
"""

from __future__ import annotations

from train.config import TrainConfig
from train.distributed import DistInfo
from train.tasks.base import EvalOutput, StepContext, Task
from train.tasks.bert4rec import Bert4RecTask
from train.tasks.retrieval import RetrievalTask
from train.tasks.tiger import TigerTask

TASKS: dict[str, type[Task]] = {
    "hstu": RetrievalTask,
    "sasrec": RetrievalTask,
    "gru4rec": RetrievalTask,
    "bert4rec": Bert4RecTask,
    "tiger": TigerTask,
}

__all__ = [
    "TASKS",
    "Bert4RecTask",
    "EvalOutput",
    "RetrievalTask",
    "StepContext",
    "Task",
    "TigerTask",
    "build_task",
]


def build_task(cfg: TrainConfig, info: DistInfo, manifest: dict) -> Task:
    """The task of ``cfg.model.name``."""
    return TASKS[cfg.model.name](cfg, info, manifest)
