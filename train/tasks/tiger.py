"""TIGER on the shared trainer (``model.name=tiger``): generative retrieval over semantic IDs.

Parts: one TorchRec token table (``tiger_tokens``: PAD, BOS, user buckets and every level's codes, see
``train/models/tiger.py``'s ``TigerVocab``), sharded like the item table of the retrieval task, and
the T5-style encoder-decoder (``Tiger``) in the DeepSpeed engine. The item -> codes map comes from a
semantic-ID table (``model.semantic_ids_dir``, format ``semantic_ids/v1``).

Training examples: every item of a training row but the first is a target, and its history is the
up to ``max_history_items`` items before it in the row (as in the paper's sliding windows). The loss is
the cross-entropy of the target's codes, level by level (teacher forcing); each code is one loss term.

Evaluation: the last item of each valid/test row is the target; beam search (``model.beam_size``
beams, constrained to the valid IDs by a prefix trie unless ``model.decode=unconstrained``) returns
the top items, best first. Items of the user's history are dropped from that list (the target is
never dropped), as in the retrieval task's protocol, so the lists can hold fewer than ``beam_size``
items. hr@k and ndcg@k are exact for k <= beam_size; mrr is truncated at the beam.

Shapes: E examples (targets) in the batch, S encoder length, L code levels, D d_model, V token ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.memory import BatchShape, FamilyMemory, stored_width
from data_pipeline.semantic_ids.table import read_semantic_ids
from train.batch import SequenceBatch, jagged_select_rows, split_last
from train.config import LossConfig
from train.embeddings import ShardedItemTable, build_table, gather_full_table
from train.metrics import ranks_from_topk
from train.models.beam_search import SemanticIdTrie, beam_search
from train.models.tiger import (
    Tiger,
    TigerConfig,
    TigerVocab,
    codes_for_vocab,
    decoder_input_ids,
    encoder_input_ids,
    make_step_fn,
    user_buckets,
)
from train.reader import raw_ids_by_dense, vocab_path
from train.tasks.base import EvalOutput, StepContext, Task

logger = logging.getLogger(__name__)

TOKEN_TABLE = "tiger_tokens"


@dataclass
class _EvalState:
    model: Tiger
    token_emb_VD: Tensor  # the gathered token table
    trie: SemanticIdTrie
    num_invalid: float = 0.0
    num_returned: float = 0.0


class TigerTask(Task):
    """Semantic-ID generation with a T5-style encoder-decoder (Rajput et al., NeurIPS 2023)."""

    def __init__(self, cfg, info, manifest):
        super().__init__(cfg, info, manifest)
        self.model_cfg: TigerConfig = cfg.model
        if cfg.loss != LossConfig():
            raise ValueError(
                "loss.* configures the retrieval task's softmax over items; TIGER's loss is the cross-entropy "
                "of the target's codes. Remove the loss: section (or its overrides) for model.name=tiger"
            )
        deepest = max([*cfg.eval.hr_at, *cfg.eval.ndcg_at])
        if deepest > self.model_cfg.beam_size:
            raise ValueError(
                f"eval.hr_at/ndcg_at ask for a cut-off of {deepest} but model.beam_size={self.model_cfg.beam_size} "
                "returns that many items at most; raise model.beam_size or lower the cut-offs"
            )
        sid_dir = self.model_cfg.semantic_ids_dir
        if not sid_dir:
            raise ValueError(
                "model.semantic_ids_dir is empty: TIGER needs a semantic-ID table for the items of data.dir. Make "
                "one with python -m data_pipeline semantic-ids (RQ-VAE over item text) or "
                "python -m data_pipeline semantic-ids-reference (a published table), then set model.semantic_ids_dir"
            )
        table = read_semantic_ids(sid_dir)
        item_raw = raw_ids_by_dense(vocab_path(cfg.data.dir, manifest, "items"))[1:].tolist()
        # Row d = codes of dense item d (row 0, padding, is -1 and never used as an input or target).
        codes = codes_for_vocab(table.item_ids, table.codes, item_raw)
        self.codes_NL = torch.from_numpy(codes)
        self.vocab = TigerVocab(tuple(table.codebook_sizes), self.model_cfg.num_user_buckets)
        user_raw = raw_ids_by_dense(vocab_path(cfg.data.dir, manifest, "users"))[1:].tolist()
        self.user_bucket_U = torch.from_numpy(
            np.concatenate([[0], user_buckets(user_raw, self.model_cfg.num_user_buckets)])
        )
        self.table: ShardedItemTable | None = None
        self._trie: SemanticIdTrie | None = None  # built at the first evaluation; the codes never change
        logger.info(
            "TIGER: %d items with %d-level semantic IDs (codebooks %s) from %s; %d token ids",
            self.num_items, self.vocab.num_levels, list(table.codebook_sizes), sid_dir, self.vocab.vocab_size,
        )  # fmt: skip

    @classmethod
    def memory_model(cls, cfg) -> FamilyMemory:
        return TigerMemory.from_config(cfg)

    @property
    def max_seq_len(self) -> int:
        return self.model_cfg.max_history_items

    def build_tables(self) -> dict[str, ShardedItemTable]:
        self.table = build_table(
            self.cfg.embeddings, self.vocab.vocab_size, self.model_cfg.d_model, self.device, self.cfg.run.seed,
            name=TOKEN_TABLE, feature="token_ids",
        )  # fmt: skip
        return {TOKEN_TABLE: self.table}

    def build_dense(self) -> nn.Module:
        return Tiger(self.model_cfg, self.vocab.codebook_sizes)

    # ------------------------------------------------------------------------------- training

    def _examples(self, batch: SequenceBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Every target of the batch with its history: ``(users_E, history_values, history_offsets, targets_E)``."""
        lengths, offsets = batch.lengths, batch.offsets
        row_T = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
        pos_T = torch.arange(len(batch.item_ids)) - offsets[:-1][row_T]
        is_target = pos_T >= 1
        target_index = torch.nonzero(is_target).squeeze(1)  # flat index of each target
        hist_len_E = pos_T[target_index].clamp(max=self.model_cfg.max_history_items)
        hist_offsets = torch.zeros(len(target_index) + 1, dtype=torch.long)
        hist_offsets[1:] = torch.cumsum(hist_len_E, 0)
        # history of example e = item_ids[target_index[e] - hist_len_E[e] : target_index[e]]
        example_of = torch.repeat_interleave(torch.arange(len(target_index)), hist_len_E)
        within = torch.arange(int(hist_offsets[-1])) - hist_offsets[:-1][example_of]
        hist_values = batch.item_ids[(target_index - hist_len_E)[example_of] + within]
        users_E = batch.user_ids[row_T[target_index]]
        return users_E, hist_values, hist_offsets, batch.item_ids[target_index]

    def count_targets(self, batch: SequenceBatch | None, ctx: StepContext) -> int:
        if batch is None:
            return 0
        return int((batch.lengths - 1).clamp(min=0).sum()) * self.vocab.num_levels

    def _embed(self, ids: Tensor, ctx: StepContext) -> Tensor:
        """Token embeddings of ``ids`` (any shape) through the sharded table, one lookup per distinct id."""
        unique, inverse = torch.unique(ids.reshape(-1).cpu(), return_inverse=True)
        emb_UD = ctx.lookup(self.table, unique).to(ctx.dense_dtype)
        return emb_UD[inverse.to(ctx.device)].view(*ids.shape, -1)

    def train_loss(self, batch: SequenceBatch, ctx: StepContext) -> tuple[Tensor, int]:
        users_E, hist_values, hist_offsets, targets_E = self._examples(batch)
        torch.manual_seed(ctx.seed * 1_000_003 + ctx.step * 1009 + ctx.rank)  # dropout
        enc_ids_ES, enc_mask_ES = encoder_input_ids(
            self.user_bucket_U[users_E], hist_values, hist_offsets, self.codes_NL, self.vocab,
            self.model_cfg.max_history_items,
        )  # fmt: skip
        target_codes_EL = self.codes_NL[targets_E]
        dec_ids_EL = decoder_input_ids(target_codes_EL[:, :-1], self.vocab)
        # One lookup for encoder and decoder tokens together (a collective: one call per step).
        num_enc = enc_ids_ES.numel()
        emb = self._embed(torch.cat([enc_ids_ES.reshape(-1), dec_ids_EL.reshape(-1)]), ctx)
        enc_emb = emb[:num_enc].view(*enc_ids_ES.shape, -1)
        dec_emb = emb[num_enc:].view(*dec_ids_EL.shape, -1)
        logits_ELV = ctx.dense(enc_emb, enc_mask_ES.to(ctx.device), dec_emb).float()
        loss_sum = F.cross_entropy(
            logits_ELV.flatten(0, 1), target_codes_EL.flatten().to(ctx.device), reduction="sum"
        )
        return loss_sum, target_codes_EL.numel()

    # ----------------------------------------------------------------------------- evaluation

    def prepare_eval(self, dense: nn.Module) -> _EvalState:
        token_emb = gather_full_table(self.table, self.device).float()
        if self._trie is None:
            trie = SemanticIdTrie.from_codes(self.codes_NL[1:].numpy(), list(self.vocab.codebook_sizes))
            self._trie = trie.to(self.device)
        return _EvalState(dense, token_emb, self._trie)

    def eval_batch(
        self,
        batch: SequenceBatch,
        prepared: _EvalState,
        top_k: int | None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> EvalOutput:
        history, targets = split_last(batch)
        keep_rows = batch.lengths >= 2
        targets = targets[keep_rows]
        if len(targets) == 0:
            return EvalOutput.empty(keep_rows, top_k)
        users = batch.user_ids[keep_rows]
        hist_lengths = history.lengths[keep_rows]
        hist_offsets = torch.zeros(len(hist_lengths) + 1, dtype=torch.long)
        hist_offsets[1:] = torch.cumsum(hist_lengths, 0)
        row_of = torch.repeat_interleave(keep_rows, history.lengths)
        hist_values = history.item_ids[row_of]
        enc_ids, enc_mask = encoder_input_ids(
            self.user_bucket_U[users], hist_values, hist_offsets, self.codes_NL, self.vocab,
            self.model_cfg.max_history_items,
        )  # fmt: skip
        model = prepared.model
        emb = prepared.token_emb_VD
        state = model.encode(emb[enc_ids.to(self.device)], enc_mask.to(self.device))
        step_fn = make_step_fn(model, state, lambda ids: emb[ids], self.vocab)
        result = beam_search(
            step_fn, prepared.trie, len(users), self.model_cfg.beam_size, self.vocab.num_levels,
            constrained=self.model_cfg.decode == "constrained",
        )  # fmt: skip
        live = torch.isfinite(result.logprob_BK)
        prepared.num_returned += float(live.sum())
        prepared.num_invalid += float(((result.item_index_BK < 0) & live).sum())
        top_BK = torch.where(
            result.item_index_BK >= 0, result.item_index_BK + 1, 0
        ).cpu()  # trie row -> dense id
        # Beam search cannot skip items, so excluded ones are dropped from its list afterwards: the
        # row's history (input_window: all of the stored row, as before), or what the evaluator gave.
        excl_values, excl_offsets = hist_values, hist_offsets
        if exclude is not None:
            excl_values, excl_offsets = jagged_select_rows(*exclude, keep_rows)
        top_BK = _drop_history(top_BK, excl_values, excl_offsets, targets)
        ranks = ranks_from_topk(top_BK, targets)
        top = None if top_k is None else _pad_to(top_BK, top_k)
        return EvalOutput(keep_rows, targets, ranks, top)

    def eval_counters(self, prepared: _EvalState) -> dict[str, tuple[float, float]]:
        if self.model_cfg.decode == "constrained":
            return {}
        return {"invalid_id_rate": (prepared.num_invalid, prepared.num_returned)}

    # ---------------------------------------------------------------------------- description

    def checkpoint_meta(self) -> dict:
        m = self.model_cfg
        return {
            "model": m.name,
            "d_model": m.d_model,
            "num_encoder_layers": m.num_encoder_layers,
            "num_decoder_layers": m.num_decoder_layers,
            "codebook_sizes": list(self.vocab.codebook_sizes),
            "num_user_buckets": m.num_user_buckets,
            "num_items": self.num_items,
        }

    def describe(self) -> dict:
        m = self.model_cfg
        return {"decode": {"mode": m.decode, "beam_size": m.beam_size}, "semantic_ids": m.semantic_ids_dir}

    def log_summary(self) -> str:
        return f"decode={self.model_cfg.decode}(beam {self.model_cfg.beam_size})"


def _drop_history(top_BK: Tensor, hist_values: Tensor, hist_offsets: Tensor, targets: Tensor) -> Tensor:
    """Remove history items (never the target) from each ranked list, keeping the order; 0 pads the end."""
    b, k = top_BK.shape
    row_T = torch.repeat_interleave(torch.arange(b), hist_offsets[1:] - hist_offsets[:-1])
    seen = torch.zeros(b, k, dtype=torch.long)
    if len(hist_values):
        # (row, item) pairs of the history, matched against every slot of the same row.
        match = (top_BK[row_T] == hist_values[:, None]) & (hist_values[:, None] != targets[row_T][:, None])
        seen.index_add_(0, row_T, match.long())
    keep = (top_BK > 0) & (seen == 0)
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    out = top_BK.gather(1, order)
    return torch.where(keep.gather(1, order), out, 0)


def _pad_to(top_BK: Tensor, k: int) -> Tensor:
    if top_BK.shape[1] >= k:
        return top_BK[:, :k]
    return F.pad(top_BK, (0, k - top_BK.shape[1]), value=0)


# ------------------------------------------------------------------------------------------------
# Memory model (cluster/memory.py's FamilyMemory for TIGER)
# ------------------------------------------------------------------------------------------------


class TigerMemory(FamilyMemory):
    """TIGER's per-rank memory terms: the token table, the encoder-decoder and its logits.

    A batch of rows with model-input lengths l (the reader's unit: items after the first) holds
    E = sum l examples (``TigerTask._examples``: every item but the first is a target); each example's
    encoder input is the user token and the codes of its last <= max_history_items items, padded to
    the batch's longest: S = 1 + L min(max l, max_history_items); the decoder reads M = L tokens. In
    ``BatchShape`` terms: ``num_tokens`` = E, ``max_len`` = S, ``padded_tokens`` = E S (encoder tokens).

    Kept for backward, per encoder token and layer (D d_model, I = H head_dim, F d_ff, b dtype bytes,
    measured with MemTracker, ``benchmarks/memory_bench.py``): the two RMSNorms' outputs and their
    normalised inputs (4D), the two residual sums (2D), the FFN's ReLU output (F; with dropout also
    the dropped copy and its mask); with dropout the two residual branches' masks. The attention:
    a fused kernel (CUDA's memory-efficient / flash, CPU flash when the mask needs no gradient and
    there is no dropout) keeps the projected Q, K, V and its output (4I); the math kernel (CPU, where
    the learned position bias rides in the mask) keeps contiguous copies of Q, K^T, V and the
    output (4I) and the softmax output, H per (query, key) pair (with dropout also the dropped copy
    and the mask): the ``attention`` term. The decoder, per decoder token and layer: three norms (6D),
    three sums (3D), the FFN, causal self-attention over M and cross-attention to the S encoder
    tokens, whose keys and values (2I per encoder token and decoder layer) the encoder computes once.
    Dropout masks are bool on CUDA, in the model's dtype on CPU (``native_dropout`` vs the CPU
    path's float noise). ``loss``: the [E, M, V_max] logits in the model's dtype, their fp32 copy, the
    cross-entropy's log-softmax and the logits' gradient. Backward's first encoder-sized tensors
    are the gradients of one decoder layer's cross keys and values (2I per encoder token), after the
    loss buffers are freed: ``activations`` holds the excess of those over ``loss``.
    ``lookup``: the step's distinct token ids (at most the table) looked up in fp32 and copied to the
    model's dtype, and the per-token copy E (S + M) x D the encoder and decoder read.
    """

    supports_checkpointing = False  # checkpoint_layers wraps HSTU / SASRec / BERT4Rec layers only

    def __init__(self, model: TigerConfig, codebook_sizes: list[int] | tuple[int, ...]):
        self.model, self.codebook_sizes = model, [int(v) for v in codebook_sizes]
        self.name, self.max_seq_len = model.name, model.max_history_items

    @classmethod
    def from_config(cls, cfg) -> TigerMemory:
        """Reads the codebook sizes from ``model.semantic_ids_dir``'s manifest."""
        path = Path(cfg.model.semantic_ids_dir) / "manifest.json"
        if not cfg.model.semantic_ids_dir or not path.is_file():
            raise ValueError(
                f"model.semantic_ids_dir={cfg.model.semantic_ids_dir!r}: no manifest.json there; TIGER's memory "
                "model needs the semantic-ID table's codebook sizes (make it with python -m data_pipeline semantic-ids)"
            )
        return cls(cfg.model, json.loads(path.read_text())["codebook_sizes"])

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    def table_shape(self, num_items: int) -> tuple[int, int]:
        return TigerVocab(
            tuple(self.codebook_sizes), self.model.num_user_buckets
        ).vocab_size, self.model.d_model

    def _layer_params(self) -> tuple[int, int]:
        m = self.model
        d, inner, f = m.d_model, m.num_heads * m.head_dim, m.d_ff
        attention, ffn = 4 * d * inner, 2 * d * f
        return 2 * d + attention + ffn, 3 * d + 2 * attention + ffn  # encoder, decoder layer

    def num_params(self) -> int:
        m = self.model
        enc, dec = self._layer_params()
        biases = 2 * m.relative_num_buckets * m.num_heads
        heads = m.d_model * sum(self.codebook_sizes)
        return m.num_encoder_layers * enc + m.num_decoder_layers * dec + 2 * m.d_model + biases + heads

    def largest_layer_params(self) -> int:
        return max(self._layer_params())

    def _encoder_len(self, most_items: int) -> int:
        return 1 + self.num_levels * min(most_items, self.model.max_history_items)

    def batch_from_lengths(self, lengths) -> BatchShape:
        ls = [int(x) for x in lengths]
        e, s = sum(ls), self._encoder_len(max(ls, default=0))
        return BatchShape(e, e, sum(x * x for x in ls), s, e * s, e * s * s)

    def batch_bound(self, num_tokens: int, sum_squares: int | None = None) -> BatchShape:
        s = self._encoder_len(self.model.max_history_items)
        e = num_tokens
        return BatchShape(e, e, e * self.max_seq_len, s, e * s, e * s * s)

    def step_terms(
        self, batch: BatchShape, *, num_items: int, dtype_bytes: int, checkpointing: bool,
        has_timestamps: bool, device_type: str,
    ) -> dict[str, int]:  # fmt: skip
        if checkpointing:
            raise ValueError("model.name=tiger: activation checkpointing is not available")
        m, b = self.model, dtype_bytes
        d, inner, f, h = m.d_model, m.num_heads * m.head_dim, m.d_ff, m.num_heads
        e, s, levels = batch.num_tokens, batch.max_len, self.num_levels
        enc_t, dec_t = batch.padded_tokens, e * levels
        drop = m.dropout > 0
        mask = 1 if device_type == "cuda" else b  # a dropout mask's bytes per element
        fused_self = device_type == "cuda"  # the position bias is in the mask: CPU takes the math kernel
        fused_cross = device_type == "cuda" or not drop

        def per_layer(norms: int) -> int:  # norms, sums, FFN and residual-dropout masks, per token
            out = b * (3 * norms * d + f)
            if drop:
                out += (b + mask) * f + mask * norms * d
            return out

        def probs(pairs: int) -> int:  # the math kernel's softmax output (and dropout) per pair
            return pairs * h * (b + ((b + mask) if drop else 0))

        linear = m.num_encoder_layers * enc_t * (per_layer(2) + b * 4 * inner)
        attention = 0 if fused_self else m.num_encoder_layers * probs(e * s * s)
        # encoder input dropout, final norm (+ dropout), cross keys and values of every decoder layer
        linear += enc_t * (((b + mask) * d if drop else 0) + 2 * b * d + (mask * d if drop else 0))
        linear += m.num_decoder_layers * enc_t * 2 * b * inner
        # self-attention as the encoder's; cross-attention: Q and the output per decoder token (the math
        # kernel also copies the shared keys and values, per encoder token)
        linear += m.num_decoder_layers * dec_t * (per_layer(3) + b * 4 * inner + b * 2 * inner)
        if not fused_cross:
            linear += m.num_decoder_layers * enc_t * 2 * b * inner
        linear += dec_t * (((b + mask) * d if drop else 0) + 2 * b * d + (mask * d if drop else 0))
        if not fused_self:
            attention += m.num_decoder_layers * probs(e * levels * levels)
        if not fused_cross:
            attention += m.num_decoder_layers * probs(e * levels * s)
        v_max = max(self.codebook_sizes)
        loss = e * levels * v_max * (b + (4 if b != 4 else 0) + 8)
        backward = enc_t * 2 * b * inner
        ids = enc_t + dec_t
        vocab = self.table_shape(num_items)[0]
        unique = min(ids, vocab)
        lookup = unique * (4 * stored_width(d) + (b * d if b != 4 else 0)) + ids * b * d
        return {
            "lookup": lookup,
            "activations": linear + max(0, backward - loss),
            "attention": attention,
            "loss": loss,
        }

    def step_flops(self, batch: BatchShape, num_items: int) -> float:
        """``6 x`` (encoder-layer params x E S + decoder-layer params x E M + the attention's pairs)."""
        m = self.model
        enc, dec = self._layer_params()
        inner, levels = m.num_heads * m.head_dim, self.num_levels
        e, s = batch.num_tokens, batch.max_len
        matmuls = m.num_encoder_layers * enc * e * s + m.num_decoder_layers * dec * e * levels
        pairs = m.num_encoder_layers * e * s * s + m.num_decoder_layers * e * levels * (levels + s)
        return 6.0 * (matmuls + 2 * inner * pairs + m.d_model * sum(self.codebook_sizes) * e)

    def lookup_rows(self, batch: BatchShape, num_items: int) -> int:
        return min(batch.padded_tokens + batch.num_tokens * self.num_levels, self.table_shape(num_items)[0])
