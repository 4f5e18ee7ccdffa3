"""Next-item retrieval over an item table: HSTU, SASRec and GRU4Rec (``model.name`` = ``hstu``,
``sasrec`` or ``gru4rec``; the encoder comes from ``train.models.build_encoder``).

Parts: one TorchRec item table (``item_table``, ``num_items + 1`` rows, row 0 padding) and a
sequence encoder (``train/models``) in the DeepSpeed engine. A training row is used autoregressively:
every item after the first is the target of the prefix before it. The loss is a softmax over
L2-normalised embeddings against sampled, in-batch or all items, or SASRec's binary cross-entropy
against sampled items (``loss:`` section). Evaluation
scores the last position's query against every item, history excluded: each rank against its own
part of the table (``eval.scoring=sharded``, ``train/scoring.py``) or against the gathered table.

Randomness (negatives, dropout) is a function of (seed, step, rank), so a resumed run draws exactly
what the uninterrupted run would have drawn.

Shapes: T = tokens in the batch (jagged), B = rows, D = embedding dim, K = negatives, I = items + 1.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cluster.memory import FamilyMemory, RetrievalMemory
from train.batch import ModelInputs, SequenceBatch, jagged_select_rows, split_inputs_targets
from train.embeddings import ShardedItemTable, local_item_rows, lookup
from train.item_embeddings import build_item_embeddings
from train.models import (
    build_encoder,
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_negatives,
    sampled_binary_loss,
    sampled_softmax_loss,
)
from train.models.config import HSTUConfig
from train.reader import raw_ids_by_dense, vocab_path
from train.scoring import QUERY_BLOCK, score_slice
from train.tasks.base import EvalOutput, StepContext, Task

logger = logging.getLogger(__name__)


class _EvalState(NamedTuple):
    raw_ID: Tensor | None  # eval.scoring=gathered: the whole table (model inputs); sharded: None
    unit_ID: Tensor  # L2-normalised rows first_id.. of the table (scores): all of it, or this rank's
    first_id: int
    encoder: nn.Module


def items_to_exclude(inputs: ModelInputs, exclude: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """Jagged ``(values, offsets)``: per kept row of ``inputs``, the items evaluation must not rank.

    ``exclude`` None (``eval.exclude=input_window``): the row's model input, as the HSTU reference;
    otherwise the evaluator's per-batch-row lists (``all_history``), cut to the kept rows.
    """
    if exclude is None:
        return inputs.input_ids, inputs.offsets
    return jagged_select_rows(*exclude, inputs.keep_rows)


class RetrievalTask(Task):
    """One item table + a sequence encoder, trained by a softmax over items."""

    servable = True

    def __init__(self, cfg, info, manifest):
        super().__init__(cfg, info, manifest)
        self.model_cfg = cfg.model
        self.has_timestamps = bool(manifest.get("has_timestamps", False))
        self.table: ShardedItemTable | None = None

    @classmethod
    def memory_model(cls, cfg) -> FamilyMemory:
        return RetrievalMemory.from_config(cfg)

    @property
    def max_seq_len(self) -> int:
        return self.model_cfg.max_seq_len

    def warn_about_data(self) -> None:
        m = self.model_cfg
        if isinstance(m, HSTUConfig) and m.use_time_bias and not self.has_timestamps:
            logger.warning(
                "%s has no timestamps: HSTU's relative attention bias uses positions only", self.cfg.data.dir
            )

    @property
    def semantic_items(self) -> bool:
        """Items embedded as sums of semantic-ID code rows (``model.item_embedding=semantic_ids``)."""
        return getattr(self.model_cfg, "item_embedding", "id") == "semantic_ids"  # HSTU and SASRec have it

    def build_tables(self) -> dict[str, ShardedItemTable]:
        raw_ids = None
        if self.semantic_items:
            raw_ids = raw_ids_by_dense(vocab_path(self.cfg.data.dir, self.manifest, "items"))[1:].tolist()
        self.items, tables = build_item_embeddings(self.cfg, self.num_items, raw_ids, self.device)
        self.table = self.items.table
        return tables

    def full_item_table(self, device: torch.device, dst: int | None = None) -> Tensor | None:
        """Every item's input embedding, row d = item d (a collective): for serving."""
        return self.items.full(device, dst=dst)

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
        emb_UD = self.items.lookup(unique_ids, ctx)
        inverse = inverse.to(ctx.device)
        num_inputs, num_targets = len(input_ids), len(targets)
        seq_emb = emb_UD[inverse[:num_inputs]].to(ctx.dense_dtype)
        tgt_emb = emb_UD[inverse[num_inputs : num_inputs + num_targets]]
        neg_emb = emb_UD[inverse[num_inputs + num_targets :]].view(*neg_ids.shape, -1)

        max_len = int(in_lengths.max().item()) if len(in_lengths) else 0
        query = ctx.dense(seq_emb, offsets.to(ctx.device), max_len, *inputs.times_on(ctx.device))
        return self._loss(query.float(), tgt_emb, targets.to(ctx.device), neg_emb, neg_ids)

    def _loss(
        self, query_ND: Tensor, tgt_emb_ND: Tensor, targets_N: Tensor, neg_emb: Tensor, neg_ids: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The ``loss:`` section's loss (softmax or binary) of N queries against their targets and the
        negatives: ``(sum over the N positions, N)``."""
        loss_cfg = self.cfg.loss
        if loss_cfg.function == "binary":  # sampled negatives only (LossConfig.validate)
            return sampled_binary_loss(
                query_ND, tgt_emb_ND, targets_N, neg_emb, neg_ids.to(query_ND.device), loss_cfg.temperature
            )
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
        # Semantic-ID items are sums over a code table: compose them all (no per-shard item rows).
        if self.cfg.eval.scoring == "gathered" or self.semantic_items:
            raw_ID = self.items.full(self.device).float()
            return _EvalState(raw_ID, F.normalize(raw_ID, dim=-1), 0, dense)
        # sharded: this rank's contiguous rows only; inputs are looked up through the sharded table.
        first_id, rows = local_item_rows(self.table, self.device)
        return _EvalState(None, F.normalize(rows.float(), dim=-1), first_id, dense)

    def eval_in_lockstep(self) -> bool:
        return self.cfg.eval.scoring == "sharded" and not self.semantic_items

    def eval_batch(
        self,
        batch: SequenceBatch | None,
        prepared: _EvalState,
        top_k: int | None,
        exclude: tuple[Tensor, Tensor] | None = None,
    ) -> EvalOutput | None:
        sharded = prepared.raw_ID is None
        if batch is None:  # sharded only: this rank has no rows left but still joins the collectives
            batch = SequenceBatch(*(torch.zeros(n, dtype=torch.long) for n in (0, 0, 0, 1)), None)
        inputs = split_inputs_targets(batch, self.max_seq_len, last_only=True)
        input_ids, offsets, targets = inputs.input_ids, inputs.offsets, inputs.targets
        excl_values, excl_offsets = items_to_exclude(inputs, exclude)
        if sharded:  # a collective: every rank looks up, even with no rows
            input_emb = lookup(self.table, input_ids, self.device).float()
        else:
            if len(targets) == 0:
                return EvalOutput.empty(inputs.keep_rows, top_k)
            input_emb = prepared.raw_ID[input_ids.to(self.device)]
        query_BD = input_emb.new_zeros(0, self.model_cfg.embedding_dim)
        if len(targets):
            offsets_d = offsets.to(self.device)
            max_len = int((offsets[1:] - offsets[:-1]).max())
            query_TD = prepared.encoder(input_emb, offsets_d, max_len, *inputs.times_on(self.device))
            query_BD = query_TD[offsets_d[1:] - 1].float()
        if sharded:
            ranks, top = self._score_over_ranks(prepared, query_BD, targets, excl_values, excl_offsets, top_k)
        else:
            ranks, top = score_slice(
                query_BD, prepared.unit_ID, 0, self.num_items, targets.to(self.device),
                excl_values.to(self.device), excl_offsets.to(self.device), top_k, group_reduce=False,
            )  # fmt: skip
        if len(targets) == 0:
            return EvalOutput.empty(inputs.keep_rows, top_k)
        return EvalOutput(inputs.keep_rows, targets, ranks.cpu(), None if top is None else top.cpu())

    def _score_over_ranks(
        self,
        prepared: _EvalState,
        query_BD: Tensor,
        targets: Tensor,
        excl_values: Tensor,
        excl_offsets: Tensor,
        top_k: int | None,
    ) -> tuple[Tensor, Tensor | None]:
        """Every rank's queries against every rank's slice (collectives); this rank's rows of the result.

        Each rank's rows are padded to the same multiple of QUERY_BLOCK before concatenation, so a
        query sits at the same position in its query block as on the gathered path (identical bits).
        """
        world, rank, device = self.info.world_size, self.info.rank, self.device
        num_rows = len(targets)
        sizes = torch.tensor([num_rows, len(excl_values)], dtype=torch.long, device=device)
        all_sizes = [torch.empty_like(sizes) for _ in range(world)]
        dist.all_gather(all_sizes, sizes)
        max_rows = max(int(s[0]) for s in all_sizes)
        if max_rows == 0:  # no rank has a row left to score: nothing to exchange (the same on every rank)
            no_top = None if top_k is None else torch.zeros(0, top_k, dtype=torch.long)
            return torch.zeros(0, dtype=torch.long), no_top
        pad = -(-max_rows // QUERY_BLOCK) * QUERY_BLOCK
        max_values = max(int(s[1]) for s in all_sizes)

        def gather_padded(x: Tensor, length: int, fill: float = 0) -> Tensor:
            padded = torch.full((length, *x.shape[1:]), fill, dtype=x.dtype, device=device)
            padded[: len(x)] = x.to(device)
            parts = [torch.empty_like(padded) for _ in range(world)]
            dist.all_gather(parts, padded)
            return torch.cat(parts)

        query_all = gather_padded(query_BD, pad)
        # Padding rows get the dummy target 1 and nothing excluded; their results are dropped.
        targets_all = gather_padded(targets, pad, fill=1)
        lengths_all = gather_padded(excl_offsets[1:] - excl_offsets[:-1], pad)
        values_all = gather_padded(excl_values, max_values)
        # Rank r's values sit at [r * max_values, ...): rebuild one jagged list over all padded rows.
        row_rank = torch.arange(world * pad, device=device) // max(pad, 1)
        starts_in_rank = torch.zeros_like(lengths_all)
        for r in range(world):
            lens = lengths_all[r * pad : (r + 1) * pad]
            starts_in_rank[r * pad : (r + 1) * pad] = torch.cumsum(lens, 0) - lens
        starts = row_rank * max_values + starts_in_rank
        row_of = torch.repeat_interleave(torch.arange(world * pad, device=device), lengths_all)
        pos = torch.arange(len(row_of), device=device) - (torch.cumsum(lengths_all, 0) - lengths_all)[row_of]
        excl_all = values_all[starts[row_of] + pos]
        offsets_all = torch.zeros(world * pad + 1, dtype=torch.long, device=device)
        torch.cumsum(lengths_all, 0, out=offsets_all[1:])
        ranks, top = score_slice(
            query_all, prepared.unit_ID, prepared.first_id, self.num_items, targets_all, excl_all,
            offsets_all, top_k, group_reduce=True,
        )  # fmt: skip
        mine = slice(rank * pad, rank * pad + num_rows)
        return ranks[mine], None if top is None else top[mine]

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
        return {
            "loss": {
                "function": loss.function,
                "negatives": loss.negatives,
                "num_negatives": loss.num_negatives,
            }
        }

    def log_summary(self) -> str:
        return f"loss={self.cfg.loss.describe()}"
