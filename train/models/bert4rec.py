"""BERT4Rec encoder (Sun et al., CIKM 2019): a bidirectional Transformer over item sequences.

The cloze task (``train/tasks/bert4rec.py``) replaces some items of a row by the mask token (a row of
the item table) and asks the encoder to recover them from both sides; at evaluation one mask is
appended after the history and its output ranks the items. Every position attends to every real
position of its own sequence (no causal mask), as in BERT. Per sequence::

    x = Dropout(LayerNorm(e + P))                          e: item (or mask) rows, P: learned positions
    per block:  x = LayerNorm(x + Dropout(MHA(x, x, x)))   softmax attention over the real positions
                x = LayerNorm(x + Dropout(W2 GELU(W1 x)))  W1: D -> ffn_dim, W2: ffn_dim -> D
    q = normalize(LayerNorm(GELU(W_o x)))                  the paper's output head, then L2 norm

The paper scores items by a dot product with the (shared) item embeddings plus a bias; here the
output is L2-normalised and scored by the task's softmax over cosine similarities with a temperature,
the same loss and scoring as every other model of the retrieval task, so the comparison with SASRec
changes the encoder and the objective only.

Shape legend: B batch, N padded length, T total tokens, D embedding_dim, H heads, Dh = D / H.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.models.config import Bert4RecConfig
from train.models.jagged import L2_NORM_EPS, jagged_positions, pad_jagged, seq_lengths, unpad_jagged


class Bert4RecBlock(nn.Module):
    """Post-norm Transformer encoder layer: bidirectional multi-head attention, then a GELU FFN."""

    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        dim = cfg.embedding_dim
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.attn_dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_output = nn.Linear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, cfg.ffn_dim), nn.GELU(), nn.Linear(cfg.ffn_dim, dim))
        self.ffn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def _heads(self, x_BND: Tensor) -> Tensor:
        num_seqs, max_len, dim = x_BND.shape
        return x_BND.view(num_seqs, max_len, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x_BND: Tensor, keys_B11N: Tensor) -> Tensor:
        """``keys_B11N``: True where the key is a real position (every query sees all of them)."""
        q_BND, k_BND, v_BND = self.qkv(x_BND).chunk(3, dim=-1)
        attn_BHNd = F.scaled_dot_product_attention(
            self._heads(q_BND),
            self._heads(k_BND),
            self._heads(v_BND),
            attn_mask=keys_B11N,
            dropout_p=self.attn_dropout if self.training else 0.0,
        )
        attn_BND = attn_BHNd.transpose(1, 2).reshape(x_BND.shape)
        x_BND = self.attn_norm(x_BND + self.dropout(self.attn_output(attn_BND)))
        return self.ffn_norm(x_BND + self.dropout(self.ffn(x_BND)))


class Bert4Rec(nn.Module):
    """BERT4Rec encoder: ``forward(item_emb [T, D], seq_offsets [B + 1], max_seq_len) -> [T, D]``."""

    def __init__(self, cfg: Bert4RecConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        dim = cfg.embedding_dim
        self.pos_emb = nn.Embedding(cfg.max_seq_len, dim)
        self.input_norm = nn.LayerNorm(dim)
        self.input_dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Bert4RecBlock(cfg) for _ in range(cfg.num_blocks))
        self.head = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.LayerNorm(dim))
        # BERT's initialisation: N(0, 0.02) weights, zero biases (LayerNorms keep 1 and 0).
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
                if isinstance(module, nn.Linear):
                    nn.init.zeros_(module.bias)

    def forward(self, item_emb: Tensor, seq_offsets: Tensor, max_seq_len: int) -> Tensor:
        """L2-normalised output of every position; each sees every real position of its sequence."""
        if item_emb.dim() != 2 or item_emb.shape[1] != self.cfg.embedding_dim:
            raise ValueError(
                f"item_emb: expected jagged values [T, {self.cfg.embedding_dim}] (model.embedding_dim), "
                f"got shape {tuple(item_emb.shape)}"
            )
        if not 1 <= max_seq_len <= self.cfg.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len}: must be in [1, model.max_seq_len={self.cfg.max_seq_len}]"
            )
        positions_T = jagged_positions(seq_offsets, item_emb.shape[0])
        x_TD = self.input_dropout(self.input_norm(item_emb + self.pos_emb(positions_T)))
        x_BND = pad_jagged(x_TD, seq_offsets, max_seq_len)
        # Padding keys are hidden from every query; padding queries still see the real keys (every
        # sequence has one), so no softmax row is empty, and their outputs are dropped by unpad.
        real_BN = (
            torch.arange(max_seq_len, device=item_emb.device)[None, :] < seq_lengths(seq_offsets)[:, None]
        )
        keys_B11N = real_BN[:, None, None, :]
        for block in self.blocks:
            x_BND = block(x_BND, keys_B11N)
        out_TD = self.head(unpad_jagged(x_BND, seq_offsets))
        return F.normalize(out_TD, p=2.0, dim=-1, eps=L2_NORM_EPS)
