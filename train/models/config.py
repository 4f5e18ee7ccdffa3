"""Configuration of the dense sequence encoders (HSTU and SASRec).

``ModelConfig`` is the ``model:`` section of the training config. Defaults reproduce the frozen
ML-1M configs of facebookresearch/generative-recommenders (``configs/ml-1m/hstu-sampled-softmax-
n128-final.gin`` and ``sasrec-sampled-softmax-n128-final.gin``): d=50, 2 blocks, 1 head, dropout 0.2.

How the fields map onto each model:

=====================  ==========================================  ===========================
field                  HSTU                                        SASRec
=====================  ==========================================  ===========================
embedding_dim          model width D (must equal the item table)   same
num_blocks             number of HSTU layers                       number of transformer blocks
num_heads              attention heads H                           heads (must divide D)
attention_dim          d_qk per head (Q and K width = H * d_qk)    ignored
linear_dim             d_v per head (U and V width = H * d_v)      FFN hidden width (not per head)
dropout                input-embedding and output-projection drop  input, FFN dropout
attn_dropout           dropout on attention weights                dropout on softmax weights
max_seq_len            positions table and relative-bias size      positions table size
num_time_buckets...    timestamp bias, see ``hstu.time_buckets``   ignored
time_gap_from          which time a position's gaps start from     ignored
attn_scale_len         n in ``SiLU(QK^T + rab) / n``               ignored
jagged                 jagged values vs padded reference path      same
=====================  ==========================================  ===========================

The reference SASRec applies dropout 0.2 to its attention weights (``attn_dropout=0.2`` here) and
the reference HSTU applies none (``attn_dropout=0.0``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from cluster.config import ConfigError

# The reference bucketises time gaps as ``(log(max(1, |dt|)) / 0.301).long()``, i.e. a logarithm in
# base exp(0.301) ~= 1.351 (each bucket is ~35% wider than the previous one).
DEFAULT_TIME_BUCKET_BASE = math.exp(0.301)


@dataclass
class ModelConfig:
    """Hyper-parameters of the sequence encoder; see the module docstring for the field mapping."""

    name: Literal["hstu", "sasrec"] = "hstu"
    embedding_dim: int = 50
    num_blocks: int = 2
    num_heads: int = 1
    attention_dim: int = 50
    linear_dim: int = 50
    dropout: float = 0.2
    attn_dropout: float = 0.0
    max_seq_len: int = 200
    # Timestamp-bias bucket of a time gap dt (seconds):
    #   min(num_time_buckets - 1, floor(log(max(1, |dt|)) / log(time_bucket_base)))
    num_time_buckets: int = 128
    time_bucket_base: float = DEFAULT_TIME_BUCKET_BASE
    use_time_bias: bool = True
    use_position_bias: bool = True
    # The time gap of query position i to key j is t_i - ts[j], where t_i is:
    #   "target": the time of the item position i predicts (the next item in training, the held-out
    #             item in eval; at serving time, the request time). The reference does this: its bias
    #             buckets ts[i + 1] - ts[j], and eval writes the target's time after the history.
    #   "input":  the time of position i's own item, ts[i] (no knowledge of when the next action is).
    time_gap_from: Literal["target", "input"] = "target"
    # "max_seq_len": divide the HSTU attention by the constant cfg.max_seq_len, as the reference
    # does in effect (it pads every batch to the configured length), so a sequence's output does not
    # depend on what else is in its batch. "batch": divide by the batch's max_seq_len argument.
    attn_scale_len: Literal["max_seq_len", "batch"] = "max_seq_len"
    jagged: bool = True

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``model.*`` key for values the types cannot rule out."""
        positive = {
            "embedding_dim": self.embedding_dim,
            "num_blocks": self.num_blocks,
            "num_heads": self.num_heads,
            "attention_dim": self.attention_dim,
            "linear_dim": self.linear_dim,
            "max_seq_len": self.max_seq_len,
            "num_time_buckets": self.num_time_buckets,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"model.{key}", f"got {value}, expected an integer >= 1")
        for key, value in {"dropout": self.dropout, "attn_dropout": self.attn_dropout}.items():
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model.{key}", f"got {value}, expected a probability in [0, 1)")
        if not self.time_bucket_base > 1.0:
            raise ConfigError(
                "model.time_bucket_base",
                f"got {self.time_bucket_base}, expected a logarithm base > 1 (default {DEFAULT_TIME_BUCKET_BASE:.4f})",
            )
        if self.name == "sasrec" and self.embedding_dim % self.num_heads != 0:
            raise ConfigError(
                "model.num_heads",
                f"SASRec splits embedding_dim={self.embedding_dim} across heads, so num_heads must divide it; "
                f"got {self.num_heads}",
            )
