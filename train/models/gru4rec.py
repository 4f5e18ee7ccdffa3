"""GRU4Rec encoder (Hidasi et al., ICLR 2016): the recurrent model that started session-based recommendation.

A next-item encoder for the retrieval task (``train/tasks/retrieval.py``), with the call signature of
the other encoders (``SequenceEncoder``): item embeddings of a jagged batch in, one L2-normalised query
per position out. Per sequence, oldest item first::

    x_t = Dropout(e_t)                          e_t: the input item's table row, width D
    h_t = GRU(x_t, h_{t-1}), num_layers deep    h_0 = 0, width H (dropout between layers)
    q_t = normalize(W h_t + b)                  W: H -> D, back to the item table's width

The GRU runs left to right, so the query of position t depends on positions <= t only; the padding
that the batch adds after a short sequence is read after its last real position and never reaches
its outputs. The GRU4Rec paper's session-parallel mini-batches and its ranking losses (BPR, TOP1) are
replaced by whole-sequence training with the task's softmax losses, as later re-implementations
(and the 2023 BERT4Rec/SASRec comparison) do. Timestamps are ignored.

Shape legend: B batch, N padded length, T total tokens, D embedding_dim, H hidden_size.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from train.models.config import GRU4RecConfig
from train.models.jagged import L2_NORM_EPS, pad_jagged, unpad_jagged


class GRU4Rec(nn.Module):
    """Embedding dropout -> multi-layer GRU -> projection to the item width -> L2 normalisation."""

    def __init__(self, cfg: GRU4RecConfig):
        super().__init__()
        self.cfg = cfg
        self.input_dropout = nn.Dropout(cfg.dropout)
        # torch applies `dropout` to the outputs of every layer but the last; with one layer it warns.
        self.gru = nn.GRU(
            cfg.embedding_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.hidden_dropout if cfg.num_layers > 1 else 0.0,
        )
        self.output = nn.Linear(cfg.hidden_size, cfg.embedding_dim)

    def forward(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """``[T, D]`` item embeddings of a jagged batch -> ``[T, D]`` L2-normalised queries."""
        if item_emb.dim() != 2 or item_emb.shape[1] != self.cfg.embedding_dim:
            raise ValueError(
                f"item_emb: expected jagged values [T, {self.cfg.embedding_dim}] (model.embedding_dim), "
                f"got shape {tuple(item_emb.shape)}"
            )
        if not 1 <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len}: must be in [1, model.max_seq_len={self.cfg.max_seq_len}]; "
                "truncate the sequences or raise model.max_seq_len"
            )
        x_BND = pad_jagged(self.input_dropout(item_emb), seq_offsets, max_seq_len)
        h_BNH, _ = self.gru(x_BND)
        out_TD = self.output(unpad_jagged(h_BNH, seq_offsets))
        return F.normalize(out_TD, p=2.0, dim=-1, eps=L2_NORM_EPS)
