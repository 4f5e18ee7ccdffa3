"""SASRec encoder (Kang & McAuley, ICDM 2018), the baseline of the HSTU paper.

Follows the SASRec of facebookresearch/generative-recommenders (research/modeling/sequential/
sasrec.py), which trains it with sampled softmax and L2-normalised outputs. One block on x:

    q_in = LayerNorm(x)
    h    = LayerNorm(q_in + MultiHeadAttention(query=q_in, key=x, value=x, causal))
    x    = h + Dropout(W2 Dropout(ReLU(W1 h)))          W1: D -> linear_dim, W2: linear_dim -> D

Layer norms without affine parameters (eps 1e-8), softmax attention with dropout ``attn_dropout``
on the weights, no final norm (the outputs are L2-normalised).

Like HSTU there are two paths with the same parameters: the jagged path runs the position-wise
parts on ``[T, D]`` values and pads only Q, K, V around a causal ``scaled_dot_product_attention``;
the padded reference runs everything on ``[B, N, D]`` with explicit masks.

Shape legend: B batch, N padded length, T total tokens, D embedding_dim, H heads, Dh = D / H.
"""

from __future__ import annotations

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.models.config import SASRecConfig
from train.models.jagged import SequenceEncoder, unpad_jagged

LAYER_NORM_EPS = 1e-8


class SASRecBlock(nn.Module):
    """Causal multi-head softmax self-attention followed by a point-wise feed-forward network."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        dim = cfg.embedding_dim
        self.num_heads = cfg.num_heads
        self.attn_dropout = cfg.attn_dropout
        self.query = nn.Linear(dim, dim)
        self.key_value = nn.Linear(dim, 2 * dim)
        self.attn_output = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, cfg.ffn_dim),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.ffn_dim, dim),
            nn.Dropout(cfg.dropout),
        )
        # The reference initialises every weight matrix with xavier_normal and keeps default biases.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)

    def _norm(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (x.shape[-1],), eps=LAYER_NORM_EPS)

    def _heads(self, x_BND: Tensor) -> Tensor:
        num_seqs, max_len, dim = x_BND.shape
        return x_BND.view(num_seqs, max_len, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def _attend(self, q_BND: Tensor, k_BND: Tensor, v_BND: Tensor, mask_B1NN: Tensor | None) -> Tensor:
        """Softmax attention on padded tensors: ``mask_B1NN`` (True = may attend) or causal when None."""
        out_BHNd = F.scaled_dot_product_attention(
            self._heads(q_BND),
            self._heads(k_BND),
            self._heads(v_BND),
            attn_mask=mask_B1NN,
            dropout_p=self.attn_dropout if self.training else 0.0,
            is_causal=mask_B1NN is None,
        )
        return out_BHNd.transpose(1, 2).reshape(q_BND.shape)

    def _finish(self, q_in_XD: Tensor, attn_XD: Tensor) -> Tensor:
        h_XD = self._norm(q_in_XD + self.attn_output(attn_XD))
        return h_XD + self.ffn(h_XD)

    def forward_jagged(self, x_TD: Tensor, seq_offsets: Tensor, max_seq_len: int) -> Tensor:
        """Jagged block: only Q, K, V are padded (fbgemm) around a causal attention kernel."""
        q_in_TD = self._norm(x_TD)
        k_TD, v_TD = self.key_value(x_TD).chunk(2, dim=-1)
        offsets, lengths = [seq_offsets], [max_seq_len]
        q_BND = torch.ops.fbgemm.jagged_to_padded_dense(self.query(q_in_TD), offsets, lengths, 0.0)
        k_BND = torch.ops.fbgemm.jagged_to_padded_dense(k_TD, offsets, lengths, 0.0)
        v_BND = torch.ops.fbgemm.jagged_to_padded_dense(v_TD, offsets, lengths, 0.0)
        # A causal mask is enough: a real query row i never reaches a padded key j <= i.
        attn_BND = self._attend(q_BND, k_BND, v_BND, None)
        attn_TD = torch.ops.fbgemm.dense_to_jagged(attn_BND, offsets, total_L=x_TD.shape[0])[0]
        return self._finish(q_in_TD, attn_TD)

    def forward_padded(self, x_BND: Tensor, mask_BNN: Tensor) -> Tensor:
        """Padded reference block with an explicit ``[B, N, N]`` mask."""
        q_in_BND = self._norm(x_BND)
        k_BND, v_BND = self.key_value(x_BND).chunk(2, dim=-1)
        attn_BND = self._attend(self.query(q_in_BND), k_BND, v_BND, mask_BNN.unsqueeze(1))
        return self._finish(q_in_BND, attn_BND)


class SASRec(SequenceEncoder):
    """SASRec sequence encoder with the ``SequenceEncoder`` interface; timestamps are ignored."""

    def __init__(self, cfg: SASRecConfig):
        super().__init__(cfg)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_blocks))

    def forward_jagged(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Jagged path: activations stay ``[T, D]``."""
        self.check_inputs(item_emb, seq_offsets, max_seq_len, timestamps, target_timestamps)
        x_TD = self.embed_inputs(item_emb, seq_offsets)
        for block in self.blocks:
            x_TD = block.forward_jagged(x_TD, seq_offsets, max_seq_len)
        return self.normalize_outputs(x_TD)

    def forward_padded(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Padded reference path: ``[B, N, D]`` activations, explicit masks."""
        self.check_inputs(item_emb, seq_offsets, max_seq_len, timestamps, target_timestamps)
        x_BND, valid_BN, causal_NN = self.pad_inputs(item_emb, seq_offsets, max_seq_len)
        # Real rows attend to real, earlier keys. Padding rows keep the plain causal mask so that no
        # softmax row is empty (which would give NaN); their outputs are zeroed below.
        mask_BNN = causal_NN[None] & (valid_BN[:, None, :] | ~valid_BN[:, :, None])
        for block in self.blocks:
            x_BND = block.forward_padded(x_BND, mask_BNN)
            x_BND = x_BND * valid_BN.unsqueeze(-1).to(x_BND.dtype)
        return self.normalize_outputs(unpad_jagged(x_BND, seq_offsets))
