"""Next-item retrieval over an item table: HSTU, SASRec and GRU4Rec (``model.name`` = ``hstu``,
``sasrec`` or ``gru4rec``; the encoder comes from ``train.models.build_encoder``).

Parts: one TorchRec item table (``item_table``, ``num_items + 1`` rows, row 0 padding) and a
sequence encoder (``train/models``) in the DeepSpeed engine. A training row is used autoregressively:
every item after the first is the target of the prefix before it. The loss is a softmax over
L2-normalised embeddings against sampled, in-batch or all items (``loss:`` section). Evaluation
scores the last position's query against every item of the gathered table, history excluded.

Randomness (negatives, dropout) is a function of (seed, step, rank), so a resumed run draws exactly
what the uninterrupted run would have drawn.

Shapes: T = tokens in the batch (jagged), B = rows, D = embedding dim, K = negatives, I = items + 1.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from train.batch import SequenceBatch, split_inputs_targets
from train.embeddings import ShardedItemTable, build_item_table, gather_full_table
from train.metrics import rank_of_targets, topk_items
from train.models import (
    build_encoder,
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_negatives,
    sampled_softmax_loss,
)
from train.models.config import HSTUConfig
from train.tasks.base import EvalOutput, StepContext, Task

logger = logging.getLogger(__name__)


class _EvalState(NamedTuple):
    raw_ID: Tensor  # the gathered table (model inputs)
    unit_ID: Tensor  # its L2-normalised rows (scores)
    encoder: nn.Module


class RetrievalTask(Task):
    """One item table + a sequence encoder, trained by a softmax over items."""

    servable = True

    def __init__(self, cfg, info, manifest):
        super().__init__(cfg, info, manifest)
        self.model_cfg = cfg.model
        self.has_timestamps = bool(manifest.get("has_timestamps", False))
        self.table: ShardedItemTable | None = None

    @property
    def max_seq_len(self) -> int:
        return self.model_cfg.max_seq_len

    def warn_about_data(self) -> None:
        m = self.model_cfg
        if isinstance(m, HSTUConfig) and m.use_time_bias and not self.has_timestamps:
            logger.warning(
                "%s has no timestamps: HSTU's relative attention bias uses positions only", self.cfg.data.dir
            )

    def build_tables(self) -> dict[str, ShardedItemTable]:
        self.table = build_item_table(
            self.cfg.embeddings, self.num_items, self.model_cfg.embedding_dim, self.device, self.cfg.run.seed
        )
        return {self.table.name: self.table}

    def build_dense(self) -> nn.Module:
        return build_encoder(self.model_cfg)

    # ------------------------------------------------------------------------------- training

    def count_targets(self, batch: SequenceBatch | None, ctx: StepContext) -> int:
        if batch is None:
            return 0
        return int((batch.lengths.clamp(max=self.max_seq_len + 1) - 1).clamp(min=0).sum())

    def _negatives(self, num_targets: int, ctx: StepContext) -> Tensor:
        loss = self.cfg.loss
        gen = torch.Generator()
        if loss.negatives == "shared":  # same draw on every rank: one global set per step
            gen.manual_seed(ctx.seed * 7919 + ctx.step)
            return sample_negatives(self.num_items, (loss.num_negatives,), gen)
        if loss.negatives == "full":  # every item: the exact softmax
            return torch.arange(1, self.num_items + 1, dtype=torch.long)
        if loss.negatives == "per_position":
            gen.manual_seed(ctx.seed * 7919 + ctx.step * 1009 + ctx.rank)
            return sample_negatives(self.num_items, (num_targets, loss.num_negatives), gen)
        return torch.empty(0, dtype=torch.long)  # in_batch: the other targets

    def train_loss(self, batch: SequenceBatch, ctx: StepContext) -> tuple[Tensor, int]:
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=False)
        input_ids, offsets, targets = inputs.input_ids, inputs.offsets, inputs.targets
        in_lengths = offsets[1:] - offsets[:-1]
        neg_ids = self._negatives(len(targets), ctx)
        torch.manual_seed(ctx.seed * 1_000_003 + ctx.step * 1009 + ctx.rank)  # dropout
        # One lookup per distinct id (inputs, targets and negatives overlap heavily), then local indexing;
        # the index backward sums the repeats' gradients before they reach the table.
        unique_ids, inverse = torch.unique(
            torch.cat([input_ids, targets, neg_ids.reshape(-1)]), return_inverse=True
        )
        emb_UD = ctx.lookup(self.table, unique_ids)
        inverse = inverse.to(ctx.device)
        num_inputs, num_targets = len(input_ids), len(targets)
        seq_emb = emb_UD[inverse[:num_inputs]].to(ctx.dense_dtype)
        tgt_emb = emb_UD[inverse[num_inputs : num_inputs + num_targets]]
        neg_emb = emb_UD[inverse[num_inputs + num_targets :]].view(*neg_ids.shape, -1)

        max_len = int(in_lengths.max().item()) if len(in_lengths) else 0
        query = ctx.dense(seq_emb, offsets.to(ctx.device), max_len, *inputs.times_on(ctx.device))
        return self._softmax_loss(query.float(), tgt_emb, targets.to(ctx.device), neg_emb, neg_ids)

    def _softmax_loss(
        self, query_ND: Tensor, tgt_emb_ND: Tensor, targets_N: Tensor, neg_emb: Tensor, neg_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The ``loss:`` section's softmax of N queries against their targets and the negatives."""
        loss_cfg = self.cfg.loss
        if loss_cfg.negatives == "in_batch":
            return in_batch_softmax_loss(query_ND, tgt_emb_ND, targets_N, loss_cfg.temperature)
        if loss_cfg.negatives == "full":  # neg_emb holds items 1..I in id order
            return full_softmax_loss(query_ND, neg_emb, targets_N, loss_cfg.temperature)
        return sampled_softmax_loss(
            query_ND, tgt_emb_ND, targets_N, neg_emb, neg_ids.to(query_ND.device), loss_cfg.temperature
        )

    # ----------------------------------------------------------------------------- evaluation

    def prepare_eval(self, dense: nn.Module) -> Any:
        # Inputs take the raw rows, as in training; scores use the L2-normalised rows, as the loss does.
        raw_ID = gather_full_table(self.table, self.device).float()
        return _EvalState(raw_ID, F.normalize(raw_ID, dim=-1), dense)

    def eval_batch(self, batch: SequenceBatch, prepared: _EvalState, top_k: int | None) -> EvalOutput:
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=True)
        input_ids, offsets, targets = inputs.input_ids, inputs.offsets, inputs.targets
        if len(targets) == 0:
            return EvalOutput.empty(inputs.keep_rows, top_k)
        input_ids_d, offsets_d = input_ids.to(self.device), offsets.to(self.device)
        max_len = int((offsets[1:] - offsets[:-1]).max())
        query_TD = prepared.encoder(
            prepared.raw_ID[input_ids_d], offsets_d, max_len, *inputs.times_on(self.device)
        )
        query_BD = query_TD[offsets_d[1:] - 1]
        scores_BI = query_BD @ prepared.unit_ID.T
        targets_d = targets.to(self.device)
        ranks = rank_of_targets(scores_BI, targets_d, input_ids_d, offsets_d)
        top = None
        if top_k is not None:
            # The target is never excluded (as in rank_of_targets), so the top list reproduces the ranks.
            top = topk_items(
                scores_BI, input_ids_d, offsets_d, k=min(top_k, self.num_items), keep_ids=targets_d
            )
        return EvalOutput(inputs.keep_rows, targets, ranks, top)

    # ---------------------------------------------------------------------------- description

    def checkpoint_meta(self) -> dict:
        m = self.model_cfg
        return {
            "model": m.name,
            **{key: getattr(m, key) for key in m.shape_fields()},
            "num_items": self.num_items,
        }

    def describe(self) -> dict:
        loss = self.cfg.loss
        return {"loss": {"negatives": loss.negatives, "num_negatives": loss.num_negatives}}

    def log_summary(self) -> str:
        return f"negatives={self.cfg.loss.describe()}"
