"""Dense models: the next-item encoders (HSTU, SASRec, GRU4Rec), their configs, and the softmax losses.

The retrieval task (``train/tasks/retrieval.py``) owns the item table; it looks up the input items'
embeddings and calls

    encoder = build_encoder(cfg.model)  # an HSTUConfig, SASRecConfig or GRU4RecConfig (model.name)
    query_TD = encoder(item_emb_TD, seq_offsets, max_seq_len, timestamps_T, target_timestamps_T)
    # query_TD: L2-normalised, causal; target_timestamps_T[t] is the time of the item t predicts
    loss_sum, num = sampled_softmax_loss(query_TD[sup], target_emb, target_ids, neg_emb, neg_ids, 0.05)

BERT4Rec (``train/models/bert4rec.py``) is bidirectional, so it is no next-item encoder: its task
(``train/tasks/bert4rec.py``) builds it directly.
"""

from __future__ import annotations

from train.models.config import (
    Bert4RecConfig,
    GRU4RecConfig,
    HSTUConfig,
    ModelConfig,
    SASRecConfig,
    SequenceEncoderConfig,
)
from train.models.gru4rec import GRU4Rec
from train.models.hstu import HSTU, time_buckets
from train.models.jagged import SequenceEncoder
from train.models.losses import (
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_negatives,
    sampled_binary_loss,
    sampled_softmax_loss,
)
from train.models.sasrec import SASRec

__all__ = [
    "Bert4RecConfig",
    "GRU4Rec",
    "GRU4RecConfig",
    "HSTU",
    "HSTUConfig",
    "ModelConfig",
    "SASRec",
    "SASRecConfig",
    "SequenceEncoderConfig",
    "SequenceEncoder",
    "build_encoder",
    "full_softmax_loss",
    "in_batch_softmax_loss",
    "sample_negatives",
    "sampled_binary_loss",
    "sampled_softmax_loss",
    "time_buckets",
]


def build_encoder(cfg: SequenceEncoderConfig | GRU4RecConfig) -> SequenceEncoder | GRU4Rec:
    """Validate ``cfg`` (``ConfigError`` on bad values) and build the next-item encoder its type names."""
    cfg.validate()
    if isinstance(cfg, HSTUConfig):
        return HSTU(cfg)
    if isinstance(cfg, SASRecConfig):
        return SASRec(cfg)
    if isinstance(cfg, GRU4RecConfig):
        return GRU4Rec(cfg)
    raise ValueError(f"model.name={cfg.name!r} has no next-item encoder (hstu, sasrec or gru4rec expected)")
