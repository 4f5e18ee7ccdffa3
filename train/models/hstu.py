"""HSTU encoder (Zhai et al., ICML 2024, "Actions Speak Louder than Words").

One HSTU layer on x [T, D] (jagged values):

    U, V, Q, K = split(SiLU(LayerNorm(x) @ W_uvqk))          U, V: H * d_v wide; Q, K: H * d_qk wide
    A[i, j]    = SiLU(Q_i . K_j + rab[i, j]) / n   for j <= i in the same sequence, else 0 (no softmax)
    x         <- x + Linear(Dropout(U * LayerNorm(A V)))

The layer norms have no affine parameters (as in the reference). ``rab`` is a learned relative
attention bias, one set per layer: a scalar per relative distance i - j (distances >=
cfg.max_seq_len share the last entry) plus a scalar per timestamp bucket of the gap ``t_i - ts[j]``
(see ``time_buckets``). As in the reference, t_i is by default the time of the item position i
predicts (``target_timestamps``: the next item in training, the held-out item in eval, the request
time in serving), so the bias knows how long ago each history item was when the next action happens;
``model.time_gap_from=input`` uses position i's own time instead. ``n`` is cfg.max_seq_len by
default (``model.attn_scale_len``).

Differences from the reference implementation (generative_recommenders/research/modeling/
sequential/hstu.py), all deliberate:
- ``num_time_buckets`` entries, clipped to the last one (the reference has num_buckets + 1);
- without timestamps the position bias is still applied (the reference drops the whole rab);
- ``attn_dropout`` is applied to A (the reference accepts the setting but ignores it).

Two paths share the parameters:

- ``forward_jagged`` keeps the activations jagged ``[T, D]``. Sequences are sorted by length and cut
  into groups of similar length (``plan_length_groups``); per group, only Q, K, V are padded to the
  group's longest sequence around the attention (fbgemm ``jagged_to_padded_dense`` /
  ``dense_to_jagged``), so short sequences do not pay [N, N] attention for the batch's N. A causal
  mask suffices there, because a real query row i never reaches a padded key j <= i.
- ``forward_padded`` is the reference: everything ``[B, N, D]`` with explicit [B, N, N] masks built
  from the lengths, pure PyTorch. Tests compare the two and both with a brute-force loop.

The time-bias bucket index is computed once per forward and shared by the layers; its gather has a
``bincount`` backward (``_GatherBias``) because the scatter-add autograd would use is slow on CPU.

Shape legend: B batch, N padded length, T total tokens, D embedding_dim, H heads,
E = H * d_qk (query/key width), F = H * d_v (value width).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm.*)
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.models.config import HSTUConfig
from train.models.jagged import SequenceEncoder, pad_jagged, seq_lengths, unpad_jagged

logger = logging.getLogger(__name__)

LAYER_NORM_EPS = 1e-6
_INT64_MAX = 2**63 - 1


def time_buckets(dt: Tensor, num_buckets: int, base: float) -> Tensor:
    """Bucket of each time gap (seconds): ``min(num_buckets - 1, floor(log(max(1, |dt|)) / log(base)))``.

    Gaps shorter than ``base`` seconds are bucket 0; each next bucket covers gaps ``base`` times longer.
    Implemented as a search among the boundaries ``base**k`` (k = 1 .. num_buckets - 1), which is exact
    for integer gaps (no float rounding of the logarithm) and faster than taking logarithms.
    Returns int64 with the shape of ``dt``.
    """
    if num_buckets < 1:
        raise ValueError(f"num_buckets: expected >= 1, got {num_buckets}")
    if not base > 1.0:
        raise ValueError(f"base: expected a logarithm base > 1, got {base}")
    powers = [_power_or_inf(base, k) for k in range(1, num_buckets)]
    gap = dt.abs()
    if gap.is_floating_point():
        boundaries = torch.tensor(powers, dtype=torch.float64, device=dt.device)
        gap = gap.to(torch.float64)
    else:
        # For an integer gap, gap >= base**k exactly when gap >= ceil(base**k): compare integers, which
        # is exact and faster than converting the [B, N, N] gaps to float64.
        boundaries = torch.tensor([_ceil_int64(p) for p in powers], dtype=torch.int64, device=dt.device)
        gap = gap.to(torch.int64)
    # right=True counts the boundaries <= gap, which is the bucket (already clipped to num_buckets - 1).
    return torch.bucketize(gap, boundaries, right=True)


def _power_or_inf(base: float, exponent: int) -> float:
    try:
        return base**exponent
    except OverflowError:
        return math.inf


def _ceil_int64(value: float) -> int:
    # No gap in seconds comes near 2**62; larger boundaries (or inf) just mean "never reached".
    return math.ceil(value) if value < 2**62 else _INT64_MAX


class _GatherBias(torch.autograd.Function):
    """``table[index]`` whose backward is one ``bincount`` (several times faster on CPU than the
    scatter-add autograd uses for indexing, with millions of [B, N, N] indices into a small table)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:
        ctx.save_for_backward(index)
        ctx.table_size = table.numel()
        return table[index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        grad_table = torch.bincount(index.reshape(-1), weights=grad.reshape(-1), minlength=ctx.table_size)
        return grad_table.to(grad.dtype), None


def relative_distances(max_seq_len: int, num_distances: int, device: torch.device) -> Tensor:
    """``[N, N]`` int64 ``i - j`` clipped to ``[0, num_distances - 1]`` (future keys get 0; they are masked)."""
    positions_N = torch.arange(max_seq_len, device=device)
    return (positions_N[:, None] - positions_N[None, :]).clamp(0, num_distances - 1)


@dataclass
class _LengthGroup:
    """Consecutive sequences of a length-sorted batch whose attention is padded to their own max_len."""

    row_start: int  # first jagged row of the group
    row_end: int
    seq_offsets: Tensor  # [B_g + 1], relative to row_start
    max_len: int
    causal_NN: Tensor  # lower-triangular ones / n
    distances_NN: Tensor
    time_index_BNN: Tensor | None


def plan_length_groups(sorted_lengths: list[int], shrink: float, min_size: int) -> list[tuple[int, int]]:
    """Split lengths sorted in descending order into ``[start, end)`` groups of consecutive sequences.

    A new group starts when a sequence is shorter than ``shrink`` times the current group's longest one
    and the current group already has ``min_size`` sequences (tiny groups make inefficient batched
    matmuls). Zero-length sequences are left out (they have no rows to attend from).
    """
    groups: list[tuple[int, int]] = []
    start = 0
    for i, length in enumerate(sorted_lengths):
        if length == 0:
            break
        if i - start >= min_size and length < shrink * sorted_lengths[start]:
            groups.append((start, i))
            start = i
    end = start
    while end < len(sorted_lengths) and sorted_lengths[end] > 0:
        end += 1
    if end > start:
        groups.append((start, end))
    return groups


class HSTULayer(nn.Module):
    """One HSTU layer: fused UVQK projection, pointwise causal attention, gated output projection."""

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.attention_dim = cfg.attention_dim
        self.linear_dim = cfg.linear_dim
        self.attn_dropout = cfg.attn_dropout
        self.split_sizes = [
            cfg.num_heads * cfg.linear_dim,  # U
            cfg.num_heads * cfg.linear_dim,  # V
            cfg.num_heads * cfg.attention_dim,  # Q
            cfg.num_heads * cfg.attention_dim,  # K
        ]
        # Initialisations follow the reference: N(0, 0.02) for W_uvqk and the biases, xavier for the output.
        self.uvqk = nn.Parameter(torch.empty(cfg.embedding_dim, sum(self.split_sizes)).normal_(0.0, 0.02))
        self.output = nn.Linear(cfg.num_heads * cfg.linear_dim, cfg.embedding_dim)
        nn.init.xavier_uniform_(self.output.weight)
        self.output_dropout = nn.Dropout(cfg.dropout)
        self.position_bias = (
            nn.Parameter(torch.empty(cfg.max_seq_len).normal_(0.0, 0.02)) if cfg.use_position_bias else None
        )
        self.time_bias = (
            nn.Parameter(torch.empty(cfg.num_time_buckets).normal_(0.0, 0.02)) if cfg.use_time_bias else None
        )

    def relative_bias(self, distances_NN: Tensor, time_index_BNN: Tensor | None) -> Tensor | None:
        """rab ``[B or 1, N, N]``: position bias by distance plus time bias by bucket; None if both are off.

        ``time_index_BNN`` comes from ``HSTU._time_index`` (None: no time bias for this batch). With both
        biases it indexes the outer sum ``time_bias[bucket] + position_bias[distance]`` flattened, so
        the [B, N, N] bias is one gather instead of two gathers and an add.
        """
        if time_index_BNN is None or self.time_bias is None:
            return None if self.position_bias is None else self.position_bias[distances_NN].unsqueeze(0)
        if self.position_bias is None:
            return _GatherBias.apply(self.time_bias, time_index_BNN)
        table = (self.time_bias[:, None] + self.position_bias[None, :]).reshape(-1)
        return _GatherBias.apply(table, time_index_BNN)

    def project(self, x_XD: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x [..., D]`` -> U, V ``[..., F]`` and Q, K ``[..., E]``."""
        normed_XD = F.layer_norm(x_XD, (x_XD.shape[-1],), eps=LAYER_NORM_EPS)
        u, v, q, k = torch.split(F.silu(normed_XD @ self.uvqk), self.split_sizes, dim=-1)
        return u, v, q, k

    def combine(self, x_XD: Tensor, u_XF: Tensor, attn_XF: Tensor) -> Tensor:
        """Residual output ``x + Linear(Dropout(U * LayerNorm(attn)))``."""
        normed_attn_XF = F.layer_norm(attn_XF, (attn_XF.shape[-1],), eps=LAYER_NORM_EPS)
        return x_XD + self.output(self.output_dropout(u_XF * normed_attn_XF))

    def _attend(self, q_BNE: Tensor, k_BNE: Tensor, v_BNF: Tensor, rab: Tensor | None, weights_mask: Tensor):
        """Pointwise attention on padded tensors; ``weights_mask`` (broadcast to [B, H, N, N]) holds 1/n or 0."""
        num_seqs, max_len, _ = q_BNE.shape
        heads = self.num_heads
        q_BNHd = q_BNE.view(num_seqs, max_len, heads, self.attention_dim)
        k_BNHd = k_BNE.view(num_seqs, max_len, heads, self.attention_dim)
        v_BNHd = v_BNF.view(num_seqs, max_len, heads, self.linear_dim)
        scores_BHNN = torch.einsum("bnhd,bmhd->bhnm", q_BNHd, k_BNHd)
        if rab is not None:
            scores_BHNN = scores_BHNN + rab.unsqueeze(1)
        weights_BHNN = F.silu(scores_BHNN) * weights_mask
        weights_BHNN = F.dropout(weights_BHNN, p=self.attn_dropout, training=self.training)
        out_BNHd = torch.einsum("bhnm,bmhd->bnhd", weights_BHNN, v_BNHd)
        return out_BNHd.reshape(num_seqs, max_len, heads * self.linear_dim)

    def forward_jagged(self, x_TD: Tensor, groups: list[_LengthGroup]) -> Tensor:
        """Jagged layer; the attention runs per length group (see ``HSTU.forward_jagged``)."""
        u_TF, v_TF, q_TE, k_TE = self.project(x_TD)
        parts = []
        for g in groups:
            offsets, lengths = [g.seq_offsets], [g.max_len]
            rows = slice(g.row_start, g.row_end)
            q_BNE = torch.ops.fbgemm.jagged_to_padded_dense(q_TE[rows], offsets, lengths, 0.0)
            k_BNE = torch.ops.fbgemm.jagged_to_padded_dense(k_TE[rows], offsets, lengths, 0.0)
            v_BNF = torch.ops.fbgemm.jagged_to_padded_dense(v_TF[rows], offsets, lengths, 0.0)
            rab = self.relative_bias(g.distances_NN, g.time_index_BNN)
            attn_BNF = self._attend(q_BNE, k_BNE, v_BNF, rab, g.causal_NN)
            parts.append(
                torch.ops.fbgemm.dense_to_jagged(attn_BNF, offsets, total_L=g.row_end - g.row_start)[0]
            )
        # No groups only when every sequence is empty (T = 0); v_TF is then the right [0, F] tensor.
        attn_TF = torch.cat(parts) if parts else v_TF
        return self.combine(x_TD, u_TF, attn_TF)

    def forward_padded(self, x_BND: Tensor, rab: Tensor | None, mask_BNN: Tensor, scale_len: int) -> Tensor:
        """Padded reference layer; ``mask_BNN`` is True where query i may attend key j."""
        u_BNF, v_BNF, q_BNE, k_BNE = self.project(x_BND)
        weights_mask_B1NN = mask_BNN.unsqueeze(1).to(x_BND.dtype) / scale_len
        attn_BNF = self._attend(q_BNE, k_BNE, v_BNF, rab, weights_mask_B1NN)
        return self.combine(x_BND, u_BNF, attn_BNF)


class HSTU(SequenceEncoder):
    """HSTU sequence encoder with the ``SequenceEncoder`` interface (jagged in, jagged out)."""

    # Length grouping of the jagged path (see ``plan_length_groups``); tests lower the minimum size.
    length_group_shrink: float = 0.75
    length_group_min_size: int = 16

    def __init__(self, cfg: HSTUConfig):
        super().__init__(cfg)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_blocks))
        self._warned_no_timestamps = False

    def _scale_len(self, max_seq_len: int) -> int:
        return self.cfg.max_seq_len if self.cfg.attn_scale_len == "max_seq_len" else max_seq_len

    def _gap_times(
        self, timestamps: Tensor | None, target_timestamps: Tensor | None
    ) -> tuple[Tensor, Tensor] | None:
        """(query times, key times), int64 ``[T]``, for this batch's time bias; None without one.

        Warns once when the bias is configured but the batch has no timestamps.
        """
        if not self.cfg.use_time_bias:
            return None
        if timestamps is None:
            if not self._warned_no_timestamps:
                logger.warning(
                    "HSTU: model.use_time_bias is on but the batch has no timestamps; using the position "
                    "bias only for such batches (set model.use_time_bias=false to silence this)"
                )
                self._warned_no_timestamps = True
            return None
        keys_T = timestamps.to(torch.int64)
        if self.cfg.time_gap_from == "input":
            return keys_T, keys_T
        if target_timestamps is None:
            raise ValueError(
                "target_timestamps: model.time_gap_from=target measures time gaps from the time of the item "
                "each position predicts; pass target_timestamps [T] with timestamps, or set "
                "model.time_gap_from=input"
            )
        return target_timestamps.to(torch.int64), keys_T

    def _time_index(self, query_ts_BN: Tensor, key_ts_BN: Tensor, distances_NN: Tensor) -> Tensor:
        """Index of every (query i, key j) into the layers' time-bias table (see ``relative_bias``):
        the bucket of ``query_ts[i] - key_ts[j]``, combined with the distance ``i - j`` when the
        position bias is on. Computed once per forward and shared by the layers."""
        dt_BNN = query_ts_BN[:, :, None] - key_ts_BN[:, None, :]
        buckets_BNN = time_buckets(dt_BNN, self.cfg.num_time_buckets, self.cfg.time_bucket_base)
        if not self.cfg.use_position_bias:
            return buckets_BNN
        return buckets_BNN * self.cfg.max_seq_len + distances_NN

    def forward_jagged(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Jagged path: activations stay ``[T, D]``; only Q, K, V are padded around the attention.

        Sequences are sorted by length and the attention runs on groups of similar length, each padded
        to its own longest sequence (``plan_length_groups``), so short sequences do not pay for
        [N, N] attention with the batch's N. Reads the lengths on the host once per call.
        """
        self.check_inputs(item_emb, seq_offsets, max_seq_len, timestamps, target_timestamps)
        x_TD = self.embed_inputs(item_emb, seq_offsets)
        gap_times = self._gap_times(timestamps, target_timestamps)
        lengths_B = seq_lengths(seq_offsets)
        lengths = lengths_B.tolist()
        order = sorted(range(len(lengths)), key=lambda b: -lengths[b])  # stable: ties keep batch order
        row_index_T = None
        if order != list(range(len(lengths))):
            order_B = torch.tensor(order, device=seq_offsets.device)
            sorted_lengths_B = lengths_B[order_B]
            sorted_starts_B = torch.cumsum(sorted_lengths_B, 0) - sorted_lengths_B
            # Row r of the sorted batch is row row_index_T[r] of the input.
            row_index_T = torch.arange(x_TD.shape[0], device=x_TD.device) + torch.repeat_interleave(
                seq_offsets[:-1][order_B] - sorted_starts_B, sorted_lengths_B, output_size=x_TD.shape[0]
            )
            x_TD = x_TD[row_index_T]
            if gap_times is not None:
                gap_times = (gap_times[0][row_index_T], gap_times[1][row_index_T])
        sorted_lengths = [lengths[b] for b in order]
        groups = self._length_groups(sorted_lengths, gap_times, self._scale_len(max_seq_len), x_TD)
        for layer in self.layers:
            x_TD = layer.forward_jagged(x_TD, groups)
        if row_index_T is not None:
            x_TD = torch.empty_like(x_TD).index_copy(0, row_index_T, x_TD)  # back to the input order
        return self.normalize_outputs(x_TD)

    def _length_groups(
        self,
        sorted_lengths: list[int],
        gap_times: tuple[Tensor, Tensor] | None,
        scale_len: int,
        like: Tensor,
    ) -> list[_LengthGroup]:
        """Per group: offsets, causal mask and time-bias index, shared by all layers.

        ``gap_times``: (query, key) times ``[T]`` of the length-sorted rows (see ``_gap_times``).
        """
        device = like.device
        groups = []
        row_starts = [0]
        for length in sorted_lengths:
            row_starts.append(row_starts[-1] + length)
        for start, end in plan_length_groups(
            sorted_lengths, self.length_group_shrink, self.length_group_min_size
        ):
            max_len = sorted_lengths[start]
            seq_offsets_G = torch.tensor(
                [r - row_starts[start] for r in row_starts[start : end + 1]], device=device
            )
            rows = slice(row_starts[start], row_starts[end])
            distances_NN = relative_distances(max_len, self.cfg.max_seq_len, device)
            time_index_BNN = None
            if gap_times is not None:
                query_ts_BN, key_ts_BN = (
                    torch.ops.fbgemm.jagged_to_padded_dense(
                        ts_T[rows].unsqueeze(1), [seq_offsets_G], [max_len], 0
                    ).squeeze(2)
                    for ts_T in gap_times
                )
                time_index_BNN = self._time_index(query_ts_BN, key_ts_BN, distances_NN)
            causal_NN = torch.tril(torch.ones(max_len, max_len, device=device, dtype=like.dtype)) / scale_len
            groups.append(
                _LengthGroup(
                    rows.start, rows.stop, seq_offsets_G, max_len, causal_NN, distances_NN, time_index_BNN
                )
            )
        return groups

    def forward_padded(
        self,
        item_emb: Tensor,
        seq_offsets: Tensor,
        max_seq_len: int,
        timestamps: Tensor | None = None,
        target_timestamps: Tensor | None = None,
    ) -> Tensor:
        """Padded reference path: ``[B, N, D]`` activations, explicit masks; same parameters and outputs."""
        self.check_inputs(item_emb, seq_offsets, max_seq_len, timestamps, target_timestamps)
        x_BND, valid_BN, causal_NN = self.pad_inputs(item_emb, seq_offsets, max_seq_len)
        mask_BNN = causal_NN[None] & valid_BN[:, :, None] & valid_BN[:, None, :]
        distances_NN = relative_distances(max_seq_len, self.cfg.max_seq_len, item_emb.device)
        time_index_BNN = None
        gap_times = self._gap_times(timestamps, target_timestamps)
        if gap_times is not None:
            query_ts_BN, key_ts_BN = (pad_jagged(ts_T, seq_offsets, max_seq_len) for ts_T in gap_times)
            time_index_BNN = self._time_index(query_ts_BN, key_ts_BN, distances_NN)
        for layer in self.layers:
            rab = layer.relative_bias(distances_NN, time_index_BNN)
            x_BND = layer.forward_padded(x_BND, rab, mask_BNN, self._scale_len(max_seq_len))
            # Padding rows compute garbage; zero them so nothing downstream can read it.
            x_BND = x_BND * valid_BN.unsqueeze(-1).to(x_BND.dtype)
        return self.normalize_outputs(unpad_jagged(x_BND, seq_offsets))
