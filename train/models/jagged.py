"""Shared pieces of the sequence encoders: the ``SequenceEncoder`` interface and jagged helpers.

A batch of B sequences is *jagged*: the values of all sequences concatenated, ``[T, ...]``, plus
``seq_offsets`` ``[B + 1]`` (``seq_offsets[b]:seq_offsets[b + 1]`` are sequence b's rows). The
*padded* layout is ``[B, N, ...]`` with N = the batch's max_seq_len and zeros after each sequence.

The padding helpers here are pure PyTorch on purpose: the padded reference paths use them, so the
fbgemm kernels of the jagged paths are checked against independent code.

Shape legend: B batch, N padded length, T total tokens (= seq_offsets[-1]), D model width.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.models.config import SequenceEncoderConfig

logger = logging.getLogger(__name__)

# Same epsilon as the reference's l2_norm_eps, also used to normalise item embeddings in the loss.
L2_NORM_EPS = 1e-6


def seq_lengths(seq_offsets_B1: Tensor) -> Tensor:
    """``[B + 1]`` offsets -> ``[B]`` lengths."""
    return seq_offsets_B1[1:] - seq_offsets_B1[:-1]


def jagged_positions(seq_offsets_B1: Tensor, num_tokens: int) -> Tensor:
    """Position of every jagged row inside its own sequence (0 = oldest item), ``[T]`` int64."""
    lengths_B = seq_lengths(seq_offsets_B1)
    # output_size avoids a device sync on GPU.
    starts_T = torch.repeat_interleave(seq_offsets_B1[:-1], lengths_B, output_size=num_tokens)
    return torch.arange(num_tokens, device=seq_offsets_B1.device) - starts_T


def pad_jagged(values_TX: Tensor, seq_offsets_B1: Tensor, max_seq_len: int) -> Tensor:
    """Jagged ``[T, *X]`` -> padded ``[B, N, *X]`` (zeros after each sequence); pure PyTorch."""
    num_seqs = seq_offsets_B1.numel() - 1
    num_tokens = values_TX.shape[0]
    seq_index_T = torch.repeat_interleave(
        torch.arange(num_seqs, device=values_TX.device), seq_lengths(seq_offsets_B1), output_size=num_tokens
    )
    out = values_TX.new_zeros((num_seqs, max_seq_len, *values_TX.shape[1:]))
    # index_put (not in-place on a leaf) so autograd flows back to values_TX.
    return out.index_put((seq_index_T, jagged_positions(seq_offsets_B1, num_tokens)), values_TX)


def unpad_jagged(padded_BNX: Tensor, seq_offsets_B1: Tensor) -> Tensor:
    """Padded ``[B, N, *X]`` -> jagged ``[T, *X]`` (drops the padding); pure PyTorch."""
    num_seqs, max_len = padded_BNX.shape[:2]
    valid_BN = torch.arange(max_len, device=padded_BNX.device)[None, :] < seq_lengths(seq_offsets_B1)[:, None]
    return padded_BNX[valid_BN]


class SequenceEncoder(nn.Module):
    """Common interface and input/output stages of HSTU and SASRec.

    ``forward(item_emb [T, D], seq_offsets [B + 1], max_seq_len, timestamps [T] | None,
    target_timestamps [T] | None) -> [T, D]`` returns an L2-normalised query embedding for every
    input position; position t only sees positions <= t of its own sequence. ``timestamps`` are the
    input items' times; ``target_timestamps[t]`` is the time of the item position t predicts (the
    next item; for a sequence's last position, the held-out target or the request time). HSTU's time
    bias may use it (``model.time_gap_from``); it reveals when, never which, the next item is.
    """

    def __init__(self, cfg: SequenceEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding_dim = cfg.embedding_dim
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.embedding_dim)
        # The reference re-initialises its position table with xavier_normal (HSTU.reset_params).
        nn.init.xavier_normal_(self.pos_emb.weight)
        self.input_dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """``[T, D]`` item embeddings -> ``[T, D]`` L2-normalised outputs (path chosen by cfg.jagged).

        Subclasses implement ``forward_jagged`` and ``forward_padded`` with this signature.
        """
        path = self.forward_jagged if self.cfg.jagged else self.forward_padded
        return path(item_emb, seq_offsets, max_seq_len, timestamps, target_timestamps)

    def check_inputs(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None,
        target_timestamps: Tensor | None = None,
    ):
        """Cheap (no device sync) checks of the caller's tensors; ``ValueError`` names the argument."""
        if item_emb.dim() != 2 or item_emb.shape[1] != self.embedding_dim:
            raise ValueError(
                f"item_emb: expected jagged values [T, {self.embedding_dim}] (model.embedding_dim), "
                f"got shape {tuple(item_emb.shape)}"
            )
        if (
            seq_offsets.dim() != 1
            or seq_offsets.numel() < 2
            or seq_offsets.dtype not in (torch.int32, torch.int64)
        ):
            raise ValueError(
                f"seq_offsets: expected [B + 1] int64 offsets with B >= 1, got {seq_offsets.dtype} "
                f"shape {tuple(seq_offsets.shape)}"
            )
        if not 1 <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len}: must be in [1, model.max_seq_len={self.cfg.max_seq_len}]; "
                "truncate the sequences or raise model.max_seq_len"
            )
        for name, ts in {"timestamps": timestamps, "target_timestamps": target_timestamps}.items():
            if ts is not None and ts.shape != item_emb.shape[:1]:
                raise ValueError(
                    f"{name}: expected [T] = [{item_emb.shape[0]}] like item_emb, got {tuple(ts.shape)}"
                )

    def embed_inputs(self, item_emb_TD: Tensor, seq_offsets_B1: Tensor) -> Tensor:
        """Scale item embeddings by sqrt(D), add absolute position embeddings, apply dropout."""
        positions_T = jagged_positions(seq_offsets_B1, item_emb_TD.shape[0])
        x_TD = item_emb_TD * math.sqrt(self.embedding_dim) + self.pos_emb(positions_T)
        return self.input_dropout(x_TD)

    def pad_inputs(self, item_emb_TD: Tensor, seq_offsets_B1: Tensor, max_seq_len: int):
        """Padded-path preamble: embedded inputs ``[B, N, D]``, ``valid_BN`` (real rows) and ``causal_NN``
        (``causal[q, k]``: key k is not after query q)."""
        x_BND = pad_jagged(self.embed_inputs(item_emb_TD, seq_offsets_B1), seq_offsets_B1, max_seq_len)
        positions_N = torch.arange(max_seq_len, device=item_emb_TD.device)
        valid_BN = positions_N[None, :] < seq_lengths(seq_offsets_B1)[:, None]
        causal_NN = positions_N[None, :] <= positions_N[:, None]
        return x_BND, valid_BN, causal_NN

    @staticmethod
    def normalize_outputs(x_TD: Tensor) -> Tensor:
        """L2-normalise every output row (the loss and retrieval use cosine similarity)."""
        return F.normalize(x_TD, p=2.0, dim=-1, eps=L2_NORM_EPS)
