"""BERT4Rec on the shared trainer (``model.name=bert4rec``): masked-item (cloze) training.

Parts: one TorchRec item table of ``num_items + 2`` rows (row 0 padding, rows 1..I the items, row
I + 1 the mask token, ``mask_id``), sharded like the retrieval task's, and the bidirectional encoder
(``train/models/bert4rec.py``) in the DeepSpeed engine.

Training: each row keeps its last ``model.max_seq_len`` items; each item is replaced by the mask
token with probability ``model.mask_prob`` (a row that draws no mask gets its last item masked, the
position evaluation asks about). The loss is the ``loss:`` section's (the softmax: full, or sampled /
in-batch negatives; or the binary loss against sampled negatives; negatives are items 1..I only) at
the masked positions only: one loss term per mask.

Which items are masked is a pure function of (run.seed, step, user id, row length, position from
the row's end), hashed (``cloze_mask``), so a resumed run masks exactly what the uninterrupted run
would have masked, and the masks do not depend on how rows are dealt to ranks (2 processes mask what
1 process masks). Dropout is seeded by (seed, step, rank) as in the retrieval task.

Evaluation: the target (each row's last item) is never shown to the encoder: the input is the last
``max_seq_len - 1`` history items followed by the mask, and the mask position's output ranks items
1..I (padding and the mask row are not candidates), the history excluded (its last ``max_seq_len``
items, the same set as the retrieval task at the same ``max_seq_len``).

Shapes: T tokens (jagged), B rows, M masked positions, D embedding dim, I items.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.memory import BatchShape, FamilyMemory, RetrievalMemory, model_dims
from train.batch import ModelInputs, SequenceBatch, split_inputs_targets
from train.embeddings import ShardedItemTable, build_table, gather_full_table
from train.models.bert4rec import Bert4Rec
from train.models.config import Bert4RecConfig
from train.scoring import score_slice
from train.tasks.base import EvalOutput, StepContext
from train.tasks.retrieval import RetrievalTask, _EvalState, items_to_exclude

_U32 = 0xFFFFFFFF


def _mul32(x: Tensor, m: int) -> Tensor:
    """``x * m mod 2**32`` for int64 ``x`` in [0, 2**32) without overflowing int64 (16-bit halves)."""
    return ((x & 0xFFFF) * m + ((((x >> 16) * m) & 0xFFFF) << 16)) & _U32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (Wellons' "lowbias32") of int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_uniform(keys: list[Tensor | int]) -> Tensor:
    """A float64 in [0, 1) per element, a deterministic hash of the int64 ``keys`` (broadcast together)."""
    h = torch.tensor(0x9E3779B9, dtype=torch.int64)  # not 0: the mix maps 0 to 0
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.int64)
        for part in (key & _U32, (key >> 32) & _U32):  # both halves of a 64-bit key
            h = _hash32(h ^ part)
    return h.double() / 2.0**32


def cloze_mask(user_ids_B: Tensor, lengths_B: Tensor, seed: int, step: int, mask_prob: float) -> Tensor:
    """``[sum(lengths)]`` bool: which items of the jagged rows are masked at training step ``step``.

    Each item is masked with probability ``mask_prob``, drawn from a hash of (seed, step, user id, row
    length, position from the row's end); a row that draws none gets its last item masked.
    """
    num_tokens = int(lengths_B.sum())
    row_T = torch.repeat_interleave(torch.arange(len(lengths_B)), lengths_B, output_size=num_tokens)
    ends_B = torch.cumsum(lengths_B, 0)
    from_end_T = ends_B[row_T] - 1 - torch.arange(num_tokens)  # 0 = the row's last item
    u_T = hashed_uniform([seed, step, user_ids_B[row_T], lengths_B[row_T], from_end_T])
    masked_T = u_T < mask_prob
    none_B = torch.zeros(len(lengths_B), dtype=torch.long).index_add_(0, row_T, masked_T.long()) == 0
    masked_T[(ends_B - 1)[none_B & (lengths_B > 0)]] = True
    return masked_T


def _last_items(batch: SequenceBatch, num_keep: int) -> tuple[Tensor, Tensor, Tensor]:
    """The rows with >= 2 items, each cut to its last ``num_keep``: ``(ids_T, lengths_B, user_ids_B)``."""
    lengths = batch.lengths
    keep_rows = lengths >= 2
    row_T = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    from_end_T = batch.offsets[1:][row_T] - 1 - torch.arange(len(batch.item_ids))
    keep_T = keep_rows[row_T] & (from_end_T < num_keep)
    return batch.item_ids[keep_T], lengths[keep_rows].clamp(max=num_keep), batch.user_ids[keep_rows]


def _offsets(lengths_B: Tensor) -> Tensor:
    offsets = torch.zeros(len(lengths_B) + 1, dtype=torch.long)
    offsets[1:] = torch.cumsum(lengths_B, 0)
    return offsets


def append_mask(ids_T: Tensor, offsets_B1: Tensor, max_seq_len: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """Each jagged row cut to its last ``max_seq_len - 1`` items, then ``mask_id``: ``(ids, offsets)``."""
    lengths_B = offsets_B1[1:] - offsets_B1[:-1]
    row_T = torch.repeat_interleave(torch.arange(len(lengths_B)), lengths_B)
    from_end_T = offsets_B1[1:][row_T] - 1 - torch.arange(len(ids_T))
    kept_T = ids_T[from_end_T < max_seq_len - 1]
    new_offsets = _offsets(lengths_B.clamp(max=max_seq_len - 1) + 1)
    out = torch.full((int(new_offsets[-1]),), mask_id, dtype=torch.long)
    is_mask = torch.zeros(len(out), dtype=torch.bool)
    is_mask[new_offsets[1:] - 1] = True
    out[~is_mask] = kept_T  # the kept items, in order, fill each row's slots before its mask
    return out, new_offsets


class Bert4RecMemory(RetrievalMemory):
    """BERT4Rec's per-rank memory terms (``cluster/memory.py``): the retrieval task's, with a table of
    ``num_items + 2`` rows (the mask row), the bidirectional encoder's activations
    (``bert4rec_activations``) and the loss over the masked positions only.

    The masked count M of a batch is random; planning uses the bound ``masked_bound``. Activation
    checkpointing applies (``checkpoint_layers`` wraps each block's ``forward``): the planner may
    pick it, and ``bert4rec_activations`` gives its terms.
    """

    def __init__(self, dims, negatives: str, num_negatives: int, mask_prob: float):
        super().__init__(dims, negatives, num_negatives)
        self.mask_prob = mask_prob
        # RetrievalMemory decides by name for HSTU / SASRec / GRU4Rec; BERT4Rec's blocks are wrapped too.
        self.supports_checkpointing = True

    @classmethod
    def from_config(cls, cfg) -> Bert4RecMemory:
        return cls(model_dims(cfg), cfg.loss.negatives, cfg.loss.num_negatives, cfg.model.mask_prob)

    def table_shape(self, num_items: int) -> tuple[int, int]:
        return num_items + 2, self.dims.embedding_dim

    def masked_bound(self, batch: BatchShape) -> int:
        """An upper bound on the masked positions of ``batch``: ``p T + B + 4 sqrt(p (1 - p) T)``,
        at most T.

        ``cloze_mask`` masks each of the T items with probability p (binomial: mean p T, standard
        deviation sqrt(p (1 - p) T); 4 of them are exceeded with probability ~3e-5), and a row that
        draws none gets its last item masked, at most one more per row (B rows). For a budget
        ``batch_bound`` assumes rows of max_seq_len; a budget filled with short rows has more rows,
        hence more forced masks (rows of 2 items: (2p + (1 - p)^2) / 2 of T).
        """
        t, p = batch.num_tokens, self.mask_prob
        return min(t, math.ceil(p * t + batch.num_rows + 4 * math.sqrt(p * (1 - p) * t)))

    def loss_positions(self, batch: BatchShape) -> int:
        return self.masked_bound(batch)

    def step_flops(self, batch: BatchShape, num_items: int) -> float:
        """``6 P_blocks T_padded + 12 L D S + 6 P_head T + 6 M C D``: the blocks run on the padded
        batch, attention (Q K^T and the weighted sum, width D) over the padded pairs S, the head over
        the T real tokens, the loss over C scored items at the M masked positions."""
        dims, t = self.dims, batch.num_tokens
        masked = self.masked_bound(batch)
        scored = masked if self.negatives == "in_batch" else self.num_negatives
        scored = num_items if self.negatives == "full" else scored
        flops = 6 * sum(dims.layer_params()) * batch.padded_tokens
        flops += 12 * dims.num_blocks * dims.embedding_dim * batch.padded_squares
        return flops + 6 * dims.head_params() * t + 6 * masked * scored * dims.embedding_dim


class Bert4RecTask(RetrievalTask):
    """The item table with a mask row + a bidirectional encoder, trained to recover masked items."""

    # train/serving.py appends the mask after a history and scores items 1..I, as eval_batch does.
    servable = True

    def __init__(self, cfg, info, manifest):
        super().__init__(cfg, info, manifest)
        self.model_cfg: Bert4RecConfig = cfg.model
        self.model_cfg.validate()
        self.mask_id = self.num_items + 1

    @classmethod
    def memory_model(cls, cfg) -> FamilyMemory:
        return Bert4RecMemory.from_config(cfg)

    def full_item_table(self, device: torch.device, dst: int | None = None) -> Tensor | None:
        """Rows 0..I + 1 of the table (padding, the items, the mask token; a collective): for serving."""
        return gather_full_table(self.table, device, dst=dst)

    def build_tables(self) -> dict[str, ShardedItemTable]:
        # Row 0 padding, 1..I items, I + 1 the mask token. Negatives and scores use rows 1..I only.
        self.table = build_table(
            self.cfg.embeddings,
            self.num_items + 2,
            self.model_cfg.embedding_dim,
            self.device,
            self.cfg.run.seed,
        )
        return {self.table.name: self.table}

    def build_dense(self) -> nn.Module:
        return Bert4Rec(self.model_cfg)

    # ------------------------------------------------------------------------------- training

    def masked_inputs(self, batch: SequenceBatch, step: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The step's cloze inputs: ``(input_ids_T with masks, offsets_B1, masked_T, targets_M)``."""
        ids_T, lengths_B, users_B = _last_items(batch, self.max_seq_len)
        masked_T = cloze_mask(users_B, lengths_B, self.cfg.run.seed, step, self.model_cfg.mask_prob)
        input_ids = torch.where(masked_T, self.mask_id, ids_T)
        return input_ids, _offsets(lengths_B), masked_T, ids_T[masked_T]

    def count_targets(self, batch: SequenceBatch | None, ctx: StepContext) -> int:
        if batch is None:
            return 0
        return len(self.masked_inputs(batch, ctx.step)[3])

    def train_loss(self, batch: SequenceBatch, ctx: StepContext) -> tuple[Tensor, int]:
        input_ids, offsets, masked_T, targets = self.masked_inputs(batch, ctx.step)
        neg_ids = self._negatives(len(targets), ctx)
        torch.manual_seed(ctx.seed * 1_000_003 + ctx.step * 1009 + ctx.rank)  # dropout
        # One lookup per distinct id of inputs (with the mask row), targets and negatives.
        unique_ids, inverse = torch.unique(
            torch.cat([input_ids, targets, neg_ids.reshape(-1)]), return_inverse=True
        )
        emb_UD = ctx.lookup(self.table, unique_ids)
        inverse = inverse.to(ctx.device)
        num_inputs, num_targets = len(input_ids), len(targets)
        seq_emb = emb_UD[inverse[:num_inputs]].to(ctx.dense_dtype)
        tgt_emb = emb_UD[inverse[num_inputs : num_inputs + num_targets]]
        neg_emb = emb_UD[inverse[num_inputs + num_targets :]].view(*neg_ids.shape, -1)
        max_len = int((offsets[1:] - offsets[:-1]).max()) if len(offsets) > 1 else 0
        query_TD = ctx.dense(seq_emb, offsets.to(ctx.device), max_len)
        query_MD = query_TD[masked_T.to(ctx.device)].float()  # the loss sees the masked positions only
        return self._loss(query_MD, tgt_emb, targets.to(ctx.device), neg_emb, neg_ids)

    # ----------------------------------------------------------------------------- evaluation

    def _mask_queries(self, inputs: ModelInputs, prepared: _EvalState) -> Tensor:
        """``[B, D]``: the encoder's output at the mask appended to each kept row's history cut (the
        target is not an input). ``inputs`` must have at least one row."""
        enc_ids, enc_offsets = append_mask(inputs.input_ids, inputs.offsets, self.max_seq_len, self.mask_id)
        enc_offsets_d = enc_offsets.to(self.device)
        max_len = int((enc_offsets[1:] - enc_offsets[:-1]).max())
        query_TD = prepared.encoder(prepared.raw_ID[enc_ids.to(self.device)], enc_offsets_d, max_len)
        return query_TD[enc_offsets_d[1:] - 1]  # the appended mask of each row

    def eval_scores(self, batch: SequenceBatch, prepared: _EvalState):
        """``(inputs, scores_BI)``: each kept row's history cut and the mask position's scores of
        items 0..I (column 0 padding; the mask row is not a column). The target is not an input."""
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=True)  # history = inputs
        if len(inputs.targets) == 0:
            return inputs, None
        return inputs, self._mask_queries(inputs, prepared) @ prepared.unit_ID[: self.num_items + 1].T

    def prepare_eval(self, dense: nn.Module) -> _EvalState:
        # The gathered table (rows 0..I + the mask row): the mask's query is scored against items only.
        raw_ID = gather_full_table(self.table, self.device).float()
        return _EvalState(raw_ID, F.normalize(raw_ID, dim=-1), 0, dense)

    def eval_in_lockstep(self) -> bool:
        return False

    def eval_batch(
        self,
        batch: SequenceBatch,
        prepared: _EvalState,
        top_k: int | None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> EvalOutput:
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=True)  # history = inputs
        if len(inputs.targets) == 0:
            return EvalOutput.empty(inputs.keep_rows, top_k)
        query_BD = self._mask_queries(inputs, prepared).float()
        excl_values, excl_offsets = items_to_exclude(inputs, exclude)
        ranks, top = score_slice(
            query_BD, prepared.unit_ID[: self.num_items + 1], 0, self.num_items, inputs.targets.to(self.device),
            excl_values.to(self.device), excl_offsets.to(self.device), top_k, group_reduce=False,
        )  # fmt: skip
        return EvalOutput(inputs.keep_rows, inputs.targets, ranks.cpu(), None if top is None else top.cpu())

    # ---------------------------------------------------------------------------- description

    def describe(self) -> dict:
        return {**super().describe(), "mask_prob": self.model_cfg.mask_prob}

    def log_summary(self) -> str:
        return f"cloze mask_prob={self.model_cfg.mask_prob}, loss={self.cfg.loss.describe()}"
