"""TIGER (Rajput et al., NeurIPS 2023, "Recommender Systems with Generative Retrieval"): the dense part.

Every item is a tuple of L semantic-ID codes (``data_pipeline/semantic_ids``). A T5-style
encoder-decoder reads a user token followed by the codes of the user's last items and decodes the
next item's codes one level at a time; at evaluation, beam search constrained to valid tuples
(``train/models/beam_search.py``) returns the top-K items.

The token embeddings are NOT in this module: the trainer owns them as TorchRec sharded tables and
passes embedded tokens in. ``TigerVocab`` fixes the token ids of one flat vocabulary::

    0                                  PAD (encoder padding; its embedding is never attended to)
    1                                  BOS (the decoder's first input)
    2 .. 2 + U - 1                     user tokens: 2 + user_bucket(raw user id)   (U = num_user_buckets)
    level_offsets[l] + code            code ``code`` of level l, level_offsets[0] = 2 + U,
                                       level_offsets[l + 1] = level_offsets[l] + codebook_sizes[l]

Sequences (``encoder_input_ids``, ``decoder_input_ids``)::

    encoder: [user, c(i1, 0), .., c(i1, L-1), .., c(in, 0), .., c(in, L-1), PAD, ..]   n <= max_history_items,
             items oldest first, right-padded; enc_mask True on real tokens (always >= 1: the user token)
    decoder: [BOS, c(t, 0), .., c(t, L-2)]  ->  level-l output predicts c(t, l)        (t = target item)

Model (pre-norm T5, as in T5 v1.0 with the paper's sizes): RMSNorm without bias; attention with
H heads of width E (H * E need not equal D) and no biases; ReLU feed-forward D -> F -> D; dropout on
embeddings, attention weights and every residual branch; one relative position bias (T5 log buckets)
for the encoder and one for the decoder, each computed once and shared by all layers; causal decoder
self-attention and cross-attention (no position bias) to the encoder output. Scores use the usual
1/sqrt(E) scale (T5 folds it into its initialisation instead; the two are equivalent up to init).

Output heads: one linear head per level (``heads[l]: D -> codebook_sizes[l]``, no bias), used only at
decoder position l. Level l's codes mean something different at every level (code 5 of level 0 is
unrelated to code 5 of level 1) and the levels have different sizes (the collision level is small),
so separate heads are the natural softmax over "the codes of level l"; one head over the union
would compute L times the logits and then mask all but one level's slice. The input tables live in
TorchRec, so the output heads are not tied to them.

Decoding recomputes the decoder over the whole prefix at each step (no KV cache): the prefix is at
most L <= 5 tokens, and the cross-attention keys and values, the expensive part, are computed once
per user in ``encode`` and shared by the user's K beams (beams are folded into the query axis).

Shape legend: B users (batch), K beams, S encoder length, M decoder length (<= L), D d_model,
H heads, E head_dim, F d_ff, L levels, V codebook size (of one level), N items, T jagged total.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.config import ConfigError

PAD_TOKEN = 0
BOS_TOKEN = 1
USER_TOKEN_OFFSET = 2
RMS_NORM_EPS = 1e-6


@dataclass
class TigerConfig:
    """Hyper-parameters of TIGER (the ``model:`` section with ``name: tiger``); defaults are the paper's (Sec. 4.1)."""

    name: Literal["tiger"] = "tiger"
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_heads: int = 6
    head_dim: int = 64
    d_model: int = 128
    d_ff: int = 1024
    dropout: float = 0.1
    # T5 relative position bias: log-spaced buckets of the query-key distance, exact below
    # num_buckets / 4 (bidirectional encoder) or num_buckets / 2 (causal decoder), merged beyond max_distance.
    relative_num_buckets: int = 32
    relative_max_distance: int = 128
    # The user token: the raw user id hashed (stably) into this many buckets.
    num_user_buckets: int = 2000
    # The encoder reads the codes of at most this many of the user's latest items.
    max_history_items: int = 20
    beam_size: int = 20
    # "constrained": beam search over valid item tuples only (a prefix trie); "unconstrained": any
    # tuple, invalid ones are dropped from the ranking and counted (eval/invalid_id_rate).
    decode: Literal["constrained", "unconstrained"] = "constrained"
    # A semantic_ids/v1 directory (data_pipeline/semantic_ids); "" leaves the choice to the task.
    semantic_ids_dir: str = ""

    def validate(self) -> None:
        """Raise ``ConfigError`` naming the ``model.*`` key for values the types cannot rule out."""
        positive = {
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "num_heads": self.num_heads,
            "head_dim": self.head_dim,
            "d_model": self.d_model,
            "d_ff": self.d_ff,
            "relative_max_distance": self.relative_max_distance,
            "num_user_buckets": self.num_user_buckets,
            "max_history_items": self.max_history_items,
            "beam_size": self.beam_size,
        }
        for key, value in positive.items():
            if value < 1:
                raise ConfigError(f"model.{key}", f"got {value}, expected an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout", f"got {self.dropout}, expected a probability in [0, 1)")
        if self.relative_num_buckets < 4 or self.relative_num_buckets % 2:
            raise ConfigError(
                "model.relative_num_buckets",
                f"got {self.relative_num_buckets}, expected an even integer >= 4 (T5 uses 32)",
            )


# ----------------------------------------------------------------------------------------------
# Token ids
# ----------------------------------------------------------------------------------------------


def user_bucket(raw_user_id: str, num_user_buckets: int) -> int:
    """The user's token bucket in [0, num_user_buckets): blake2b of the raw id string, so the same in
    every process and run (Python's ``hash()`` is salted per process)."""
    digest = hashlib.blake2b(str(raw_user_id).encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") % num_user_buckets


def user_buckets(raw_user_ids, num_user_buckets: int) -> np.ndarray:
    """``user_bucket`` of every id, as int64 [len(raw_user_ids)] (e.g. indexed by dense user id - 1)."""
    return np.fromiter((user_bucket(u, num_user_buckets) for u in raw_user_ids), dtype=np.int64)


@dataclass(frozen=True)
class TigerVocab:
    """The flat token vocabulary (see the module docstring): PAD, BOS, user buckets, codes by level."""

    codebook_sizes: tuple[int, ...]
    num_user_buckets: int

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def level_offsets(self) -> tuple[int, ...]:
        """Token id of code 0 of each level."""
        first = USER_TOKEN_OFFSET + self.num_user_buckets
        return tuple(int(x) for x in first + np.concatenate([[0], np.cumsum(self.codebook_sizes)[:-1]]))

    @property
    def vocab_size(self) -> int:
        """Number of token ids (rows of the trainer's token table)."""
        return USER_TOKEN_OFFSET + self.num_user_buckets + int(sum(self.codebook_sizes))


def codes_for_vocab(item_ids: np.ndarray, codes_NL: np.ndarray, vocab_raw_ids) -> np.ndarray:
    """Codes by dense item id: row d is the tuple of ``vocab_raw_ids[d - 1]`` and row 0 (padding) is -1.

    ``item_ids``/``codes_NL``: a semantic-ID table (``read_semantic_ids``). ``vocab_raw_ids``: the
    prepared data's ``vocab/items.parquet`` raw ids in dense-id order (dense id = position + 1).
    Build the decoding trie from ``out[1:]``: then beam search's item index i is dense id i + 1.
    """
    row_of = {item: i for i, item in enumerate(item_ids.tolist())}
    missing = [r for r in vocab_raw_ids if r not in row_of]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(vocab_raw_ids)} prepared items have no semantic ID (e.g. raw ids {missing[:5]}); "
            "build the semantic IDs from the same prepared data (python -m data_pipeline semantic-ids)"
        )
    rows = np.fromiter((row_of[r] for r in vocab_raw_ids), dtype=np.int64, count=len(vocab_raw_ids))
    out = np.full((len(vocab_raw_ids) + 1, codes_NL.shape[1]), -1, dtype=np.int64)
    out[1:] = codes_NL[rows]
    return out


def encoder_input_ids(
    user_bucket_B: Tensor,
    history_values_T: Tensor,
    history_offsets: Tensor,
    item_codes_NL: Tensor,
    vocab: TigerVocab,
    max_history_items: int,
) -> tuple[Tensor, Tensor]:
    """Encoder token ids ``[user, codes of the last <= max_history_items items]``, right-padded.

    ``history_values_T``/``history_offsets`` ([B + 1]): each user's item ids (rows of
    ``item_codes_NL``, e.g. dense ids), oldest first. Returns ``(ids_BS, mask_BS)`` with
    S = 1 + L * (most items kept for one user); mask True on real tokens, ids PAD elsewhere.
    """
    num_levels = vocab.num_levels
    lengths_B = (history_offsets[1:] - history_offsets[:-1]).clamp(max=max_history_items)
    num_kept = int(lengths_B.max()) if lengths_B.numel() else 0
    start_B = history_offsets[1:] - lengths_B
    slot_S = torch.arange(num_kept * num_levels, device=history_values_T.device)
    item_slot_S, level_S = slot_S // num_levels, slot_S % num_levels
    valid_BS = item_slot_S[None, :] < lengths_B[:, None]
    pos_BS = (start_B[:, None] + item_slot_S[None, :]).clamp(max=max(history_values_T.numel() - 1, 0))
    items_BS = history_values_T[pos_BS] if history_values_T.numel() else torch.zeros_like(pos_BS)
    offsets_L = torch.tensor(vocab.level_offsets, device=items_BS.device)
    codes_BS = item_codes_NL[items_BS, level_S[None, :].expand_as(items_BS)]
    code_ids_BS = torch.where(valid_BS, offsets_L[level_S][None, :] + codes_BS, PAD_TOKEN)
    user_B1 = (USER_TOKEN_OFFSET + user_bucket_B)[:, None]
    ids_BS = torch.cat([user_B1, code_ids_BS], dim=1)
    mask_BS = torch.cat([torch.ones_like(user_B1, dtype=torch.bool), valid_BS], dim=1)
    return ids_BS, mask_BS


def decoder_input_ids(prefix_codes: Tensor, vocab: TigerVocab) -> Tensor:
    """``[BOS, level_offsets[0] + c0, ..]`` for prefix codes ``[..., m]`` -> ids ``[..., m + 1]``.

    Teacher forcing passes the target's first L-1 codes; beam search passes each beam's prefix.
    """
    m = prefix_codes.shape[-1]
    offsets = torch.tensor(vocab.level_offsets[:m], device=prefix_codes.device, dtype=torch.long)
    bos = torch.full((*prefix_codes.shape[:-1], 1), BOS_TOKEN, device=prefix_codes.device, dtype=torch.long)
    return torch.cat([bos, prefix_codes.long() + offsets], dim=-1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


def relative_position_bucket(
    relative_position: Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> Tensor:
    """T5's bucket of ``key_pos - query_pos``: exact for small distances, log-spaced up to
    ``max_distance``, the last bucket beyond. Bidirectional: half the buckets for keys after the query.
    A causal decoder only sees keys at or before the query, so it maps later keys to bucket 0 (masked)."""
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # log(distance / max_exact) / log(max_distance / max_exact) in [0, 1) maps onto the remaining buckets.
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (num_buckets - max_exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """One learned scalar per (bucket, head); ``forward(q_len, k_len)`` -> bias ``[1, H, q_len, k_len]``."""

    def __init__(self, cfg: TigerConfig, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = cfg.relative_num_buckets
        self.max_distance = cfg.relative_max_distance
        self.bias = nn.Embedding(cfg.relative_num_buckets, cfg.num_heads)

    def forward(self, q_len: int, k_len: int) -> Tensor:
        device = self.bias.weight.device
        rel_QK = torch.arange(k_len, device=device)[None, :] - torch.arange(q_len, device=device)[:, None]
        buckets_QK = relative_position_bucket(rel_QK, self.bidirectional, self.num_buckets, self.max_distance)
        return self.bias(buckets_QK).permute(2, 0, 1).unsqueeze(0)


class Attention(nn.Module):
    """Multi-head attention without biases; H heads of width E, output projected back to D."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        inner = cfg.num_heads * cfg.head_dim
        self.num_heads, self.head_dim, self.dropout = cfg.num_heads, cfg.head_dim, cfg.dropout
        self.query = nn.Linear(cfg.d_model, inner, bias=False)
        self.key = nn.Linear(cfg.d_model, inner, bias=False)
        self.value = nn.Linear(cfg.d_model, inner, bias=False)
        self.output = nn.Linear(inner, cfg.d_model, bias=False)

    def heads(self, x_BXD: Tensor, proj: nn.Linear) -> Tensor:
        """Project and split into heads: ``[B, X, D]`` -> ``[B, H, X, E]``."""
        b, x, _ = x_BXD.shape
        return proj(x_BXD).view(b, x, self.num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, x_BSD: Tensor) -> tuple[Tensor, Tensor]:
        return self.heads(x_BSD, self.key), self.heads(x_BSD, self.value)

    def forward(self, q_BQD: Tensor, k_BHSE: Tensor, v_BHSE: Tensor, attn_mask: Tensor) -> Tensor:
        """``attn_mask``: additive float (0 / -inf plus position bias) broadcastable to [B, H, Q, S]."""
        out_BHQE = F.scaled_dot_product_attention(
            self.heads(q_BQD, self.query),
            k_BHSE,
            v_BHSE,
            attn_mask=attn_mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        b, _, q, _ = out_BHQE.shape
        return self.output(out_BHQE.transpose(1, 2).reshape(b, q, -1))


class FeedForward(nn.Module):
    """T5 v1.0 feed-forward: ReLU(x W1) W2, no biases, dropout on the hidden units."""

    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: Tensor, attn_mask_BHSS: Tensor) -> Tensor:
        h_BSD = self.attn_norm(x_BSD)
        k_BHSE, v_BHSE = self.attn.key_value(h_BSD)
        x_BSD = x_BSD + self.dropout(self.attn(h_BSD, k_BHSE, v_BHSE, attn_mask_BHSS))
        return x_BSD + self.dropout(self.ffn(self.ffn_norm(x_BSD)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TigerConfig):
        super().__init__()
        self.self_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.self_attn = Attention(cfg)
        self.cross_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.cross_attn = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x_BKMD: Tensor,
        self_mask_1HMM: Tensor,
        cross_k_BHSE: Tensor,
        cross_v_BHSE: Tensor,
        cross_mask_B11S: Tensor,
        past_kv: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One layer on the M newest decoder positions; ``past_kv``: the self-attention keys and values
        of the earlier positions (``[B * K, H, P, E]``). Returns the output and the keys/values of all
        P + M positions (the cache for the next step)."""
        b, k, m, d = x_BKMD.shape
        h_XMD = self.self_norm(x_BKMD).reshape(b * k, m, d)
        self_k, self_v = self.self_attn.key_value(h_XMD)
        if past_kv is not None:
            self_k, self_v = torch.cat([past_kv[0], self_k], dim=2), torch.cat([past_kv[1], self_v], dim=2)
        x_BKMD = x_BKMD + self.dropout(self.self_attn(h_XMD, self_k, self_v, self_mask_1HMM)).view(b, k, m, d)
        # A user's K beams share its encoder output, so fold beams into the query axis: [B, K * M, D].
        h_BQD = self.cross_norm(x_BKMD).reshape(b, k * m, d)
        x_BKMD = x_BKMD + self.dropout(
            self.cross_attn(h_BQD, cross_k_BHSE, cross_v_BHSE, cross_mask_B11S)
        ).view(b, k, m, d)
        return x_BKMD + self.dropout(self.ffn(self.ffn_norm(x_BKMD))), (self_k, self_v)


@dataclass
class EncoderState:
    """What decoding needs from the encoder: per decoder layer, the cross-attention keys and values
    (``[B, H, S, E]``), and the additive key-padding mask ``[B, 1, 1, S]``."""

    cross_kv: list[tuple[Tensor, Tensor]]
    cross_mask_B11S: Tensor


class Tiger(nn.Module):
    """The TIGER encoder-decoder over embedded tokens (see the module docstring)."""

    def __init__(self, cfg: TigerConfig, codebook_sizes: list[int] | tuple[int, ...]):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.codebook_sizes = [int(v) for v in codebook_sizes]
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder_bias = RelativePositionBias(cfg, bidirectional=True)
        self.decoder_bias = RelativePositionBias(cfg, bidirectional=False)
        self.encoder_layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.decoder_layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.encoder_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.decoder_norm = nn.RMSNorm(cfg.d_model, eps=RMS_NORM_EPS)
        self.heads = nn.ModuleList(nn.Linear(cfg.d_model, v, bias=False) for v in self.codebook_sizes)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def encode(self, enc_emb_BSD: Tensor, enc_mask_BS: Tensor) -> EncoderState:
        """Run the encoder on embedded tokens (``enc_mask_BS`` True on real tokens, >= 1 per row)."""
        _, s, _ = enc_emb_BSD.shape
        neg_inf = torch.finfo(enc_emb_BSD.dtype).min
        key_mask_B11S = torch.zeros(enc_mask_BS.shape, dtype=enc_emb_BSD.dtype, device=enc_emb_BSD.device)
        key_mask_B11S = key_mask_B11S.masked_fill(~enc_mask_BS, neg_inf)[:, None, None, :]
        self_mask_BHSS = self.encoder_bias(s, s) + key_mask_B11S
        x_BSD = self.dropout(enc_emb_BSD)
        for layer in self.encoder_layers:
            x_BSD = layer(x_BSD, self_mask_BHSS)
        out_BSD = self.dropout(self.encoder_norm(x_BSD))
        cross_kv = [layer.cross_attn.key_value(out_BSD) for layer in self.decoder_layers]
        return EncoderState(cross_kv=cross_kv, cross_mask_B11S=key_mask_B11S)

    def decode(self, state: EncoderState, dec_emb_BKMD: Tensor) -> Tensor:
        """Decoder hidden states ``[B, K, M, D]`` for K embedded decoder inputs per user (causal)."""
        return self.decode_with_cache(state, dec_emb_BKMD, None)[0]

    def decode_with_cache(
        self, state: EncoderState, new_emb_BKMD: Tensor, cache: list[tuple[Tensor, Tensor]] | None
    ) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
        """Decode the M newest positions after the P cached ones (``cache``: per layer, self-attention
        keys and values ``[B * K, H, P, E]`` in the row order of ``new_emb_BKMD``, or None for P = 0).
        Returns the hidden states ``[B, K, M, D]`` of the new positions and the cache of all P + M."""
        m = new_emb_BKMD.shape[2]
        past = 0 if cache is None else cache[0][0].shape[2]
        total = past + m
        causal_MT = torch.ones(total, total, dtype=torch.bool, device=new_emb_BKMD.device).tril()[past:]
        neg_inf = torch.finfo(new_emb_BKMD.dtype).min
        self_mask_1HMT = self.decoder_bias(total, total)[:, :, past:].masked_fill(~causal_MT, neg_inf)
        x_BKMD = self.dropout(new_emb_BKMD)
        new_cache = []
        for i, (layer, (cross_k, cross_v)) in enumerate(zip(self.decoder_layers, state.cross_kv)):
            past_kv = None if cache is None else cache[i]
            x_BKMD, kv = layer(x_BKMD, self_mask_1HMT, cross_k, cross_v, state.cross_mask_B11S, past_kv)
            new_cache.append(kv)
        return self.dropout(self.decoder_norm(x_BKMD)), new_cache

    def forward(self, enc_emb_BSD: Tensor, enc_mask_BS: Tensor, dec_emb_BMD: Tensor) -> Tensor:
        """Teacher forcing: logits ``[B, M, V_max]``; position l scores level l's codes, and entries
        past that level's codebook size are -inf (so cross-entropy over the row is level l's softmax)."""
        h_BMD = self.decode(self.encode(enc_emb_BSD, enc_mask_BS), dec_emb_BMD[:, None])[:, 0]
        b, m, _ = h_BMD.shape
        v_max = max(self.codebook_sizes[:m])
        logits_BMV = h_BMD.new_full((b, m, v_max), float("-inf"))
        for level in range(m):
            logits_BMV[:, level, : self.codebook_sizes[level]] = self.heads[level](h_BMD[:, level])
        return logits_BMV

    def decode_step(self, state: EncoderState, dec_emb_BKMD: Tensor) -> Tensor:
        """Logits ``[B, K, V]`` of level M-1's codes after the decoder inputs ``[BOS, c0, .., c(M-2)]``."""
        level = dec_emb_BKMD.shape[2] - 1
        return self.heads[level](self.decode(state, dec_emb_BKMD)[:, :, -1])


def tiger_loss(logits_BMV: Tensor, target_codes_BM: Tensor) -> Tensor:
    """Mean cross-entropy over the B * M predicted codes (the seq2seq loss of TIGER)."""
    return F.cross_entropy(logits_BMV.flatten(0, 1), target_codes_BM.flatten().long())


def make_step_fn(
    model: Tiger,
    state: EncoderState,
    embed: Callable[[Tensor], Tensor],
    vocab: TigerVocab,
    use_cache: bool = True,
) -> Callable[[int, Tensor, Tensor | None], Tensor]:
    """The ``step_fn`` of ``beam_search`` for one batch: ``(level, prefix_codes_BKl, parent_BK) -> logits_BKV``.

    ``embed`` maps token ids ``[B, K, M]`` to embeddings ``[B, K, M, D]`` (the trainer's table lookup).
    With ``use_cache`` (default) each step runs the decoder on the newest token only, reusing the
    self-attention keys and values of the beam's parent (``parent_BK``: the beam of the previous step
    that each prefix extends); without it, each step recomputes the whole prefix. The step function
    keeps the cache, so make a new one for every ``beam_search`` call.
    """
    cache: list[tuple[Tensor, Tensor]] | None = None

    def step_fn(level: int, prefix_codes_BKl: Tensor, parent_BK: Tensor | None = None) -> Tensor:
        nonlocal cache
        assert prefix_codes_BKl.shape[-1] == level
        ids_BKM = decoder_input_ids(prefix_codes_BKl, vocab)
        if not use_cache or level == 0 or parent_BK is None:
            hidden_BKMD, cache = model.decode_with_cache(state, embed(ids_BKM), None)
        else:
            # Reorder the parents' cache to the new beams: rows are (user, beam) pairs.
            b, k = parent_BK.shape
            num_prev = cache[0][0].shape[0] // b
            rows = (torch.arange(b, device=parent_BK.device)[:, None] * num_prev + parent_BK).reshape(-1)
            cache = [(keys[rows], values[rows]) for keys, values in cache]
            hidden_BKMD, cache = model.decode_with_cache(state, embed(ids_BKM[:, :, -1:]), cache)
        return model.heads[level](hidden_BKMD[:, :, -1])

    return step_fn
