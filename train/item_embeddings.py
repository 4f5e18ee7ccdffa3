"""How a retrieval model embeds an item: a free row per item, or the sum of its semantic-ID codes' rows.

``model.item_embedding``:

* ``id`` (default): one row of the item table per item (``item_table``, ``num_items + 1`` rows).
* ``semantic_ids``: one table of code rows (``item_code_table``: row 0 padding, then level 0's codes,
  level 1's, ...), and item d's embedding is the sum over levels l of the row of its code c_l:
  ``E[d] = sum_l C[1 + offset_l + c_l(d)]``. Items that share a prefix share those rows, so an item
  seen rarely (or never, see the cold-start split) borrows what its neighbours in code space learnt.
  The codes come from a semantic-ID table (``model.semantic_ids_dir``, ``semantic_ids/v1``), built
  from item text by ``python -m data_pipeline semantic-ids`` or converted from a published one.

Both expose the same two calls: ``lookup(ids, ctx)`` for training (through the sharded table, with
the trainer's gradient scaling) and ``full(device)`` for evaluation (every item's embedding, row d =
item d). Shapes: U ids, L levels, D width, I = num_items + 1.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from train.embeddings import ShardedItemTable, build_item_table, build_table, gather_full_table

CODE_TABLE = "item_code_table"


class IdItemEmbeddings:
    """One free row per item."""

    def __init__(self, table: ShardedItemTable):
        self.table = table

    def lookup(self, ids_U: Tensor, ctx) -> Tensor:
        return ctx.lookup(self.table, ids_U)

    def full(self, device: torch.device, dst: int | None = None) -> Tensor | None:
        return gather_full_table(self.table, device, dst=dst)


class SemanticIdItemEmbeddings:
    """Item embedding = sum of its codes' rows (one code table shared by all levels, offset by level)."""

    def __init__(self, table: ShardedItemTable, token_ids_IL: Tensor):
        self.table = table
        self.token_ids_IL = token_ids_IL  # row d: the code-table rows of item d's codes (row 0: padding)

    def lookup(self, ids_U: Tensor, ctx) -> Tensor:
        tokens_UL = self.token_ids_IL[ids_U.cpu()]
        rows = ctx.lookup(self.table, tokens_UL.reshape(-1))
        return rows.view(*tokens_UL.shape, -1).sum(dim=1)

    def full(self, device: torch.device, dst: int | None = None) -> Tensor | None:
        codes_CD = gather_full_table(self.table, device, dst=dst)
        return None if codes_CD is None else codes_CD[self.token_ids_IL.to(device)].sum(dim=1)


def code_table_token_ids(codes_IL: np.ndarray, codebook_sizes: list[int]) -> Tensor:
    """int64 [I, L]: the code-table row of each item's code at each level (row 0 of ``codes_IL``,
    the padding item, is -1 everywhere and maps to row 0, the padding row, at every level)."""
    offsets = 1 + np.concatenate([[0], np.cumsum(codebook_sizes)[:-1]]).astype(np.int64)
    tokens = codes_IL + offsets[None, :]
    tokens[codes_IL < 0] = 0
    return torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))


def build_item_embeddings(cfg, num_items: int, item_raw_ids: list[str] | None, device: torch.device):
    """The item embeddings of ``cfg.model.item_embedding`` and the tables to register with the trainer.

    ``item_raw_ids``: the prepared data's raw item ids in dense-id order (needed for semantic IDs)."""
    model = cfg.model
    mode = getattr(model, "item_embedding", "id")
    if mode == "id":
        table = build_item_table(cfg.embeddings, num_items, model.embedding_dim, device, cfg.run.seed)
        return IdItemEmbeddings(table), {table.name: table}
    from data_pipeline.semantic_ids.table import read_semantic_ids
    from train.models.tiger import codes_for_vocab

    if not model.semantic_ids_dir:
        raise ValueError(
            "model.item_embedding=semantic_ids needs model.semantic_ids_dir: a semantic-ID table of the items of "
            "data.dir (python -m data_pipeline semantic-ids, or semantic-ids-reference for a published one)"
        )
    sid = read_semantic_ids(model.semantic_ids_dir)
    codes_IL = codes_for_vocab(sid.item_ids, sid.codes, item_raw_ids)
    token_ids_IL = code_table_token_ids(codes_IL, list(sid.codebook_sizes))
    table = build_table(
        cfg.embeddings, 1 + int(sum(sid.codebook_sizes)), model.embedding_dim, device, cfg.run.seed,
        name=CODE_TABLE, feature="code_ids",
    )  # fmt: skip
    return SemanticIdItemEmbeddings(table, token_ids_IL), {table.name: table}
