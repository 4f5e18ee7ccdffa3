"""Vectors for items without text (``embed.missing_text=checkpoint``), from a trained item table.

An item with no title, brand, category or description has nothing for the sentence encoder to read.
A trained HSTU or SASRec run knows it anyway, from who interacted with it: its row of the item table
sits near items bought or watched by the same users. The fallback gives such an item the mean text
vector of its ``k`` nearest items *that have text*, nearest by cosine in the checkpoint's item table,
rescaled to their mean norm. The vector lives in the encoder's space (any width of the table works),
so the RQ-VAE and the semantic IDs treat it like every other item's.

The checkpoint must come from a run on the same prepared data (same item vocabulary): its
``meta.json`` holds ``num_items``, checked against the data's. Memory: the item table (items x width)
and the missing items' neighbours' vectors; the text vectors are streamed from the part files.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ITEM_TABLE = "item_table"  # the retrieval task's table name in checkpoints (train/embeddings.py)


def load_checkpoint_item_table(checkpoint: str | Path) -> np.ndarray:
    """float32 [num_items + 1, embedding_dim] item table of a trainer checkpoint (``.../step_NNNNNNNN``),
    merged from its DCP shards on any machine, without a process group. Row 0 is padding."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = Path(checkpoint)
    meta_path, sparse = path / "meta.json", path / "sparse"
    if not meta_path.is_file() or not sparse.is_dir():
        raise ValueError(
            f"embed.fallback_checkpoint: {path} is not a trainer checkpoint (expected meta.json and sparse/ in "
            "it, e.g. runs/<run>/checkpoints/step_00001234)"
        )
    meta = json.loads(meta_path.read_text())
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "sparse.pt"
        dcp_to_torch_save(str(sparse), str(merged))
        state = torch.load(merged, weights_only=False)
    if ITEM_TABLE not in state:
        raise ValueError(
            f"embed.fallback_checkpoint: {path} has no {ITEM_TABLE!r} (it has {sorted(state)}); use a checkpoint "
            "of an HSTU or SASRec run, whose items are rows of one table"
        )
    weights = [v for k, v in state[ITEM_TABLE]["model"].items() if k.endswith(".weight")]
    assert len(weights) == 1, f"one weight in the item table's state, got {list(state[ITEM_TABLE]['model'])}"
    table = weights[0].float().numpy()
    dim = int(meta.get("embedding_dim", table.shape[1]))
    return np.ascontiguousarray(table[:, :dim])  # stored widths are padded to a multiple of 4


def neighbours_with_text(
    table_ID: np.ndarray, missing_ids: np.ndarray, has_text: np.ndarray, k: int, chunk: int = 4096
) -> np.ndarray:
    """int64 [len(missing_ids), k]: for each missing item, the dense ids of the ``k`` items with text
    whose table rows have the highest cosine similarity to its row (ties: the lower id first).

    ``has_text`` is a boolean per dense id (index 0, padding, is False)."""
    candidates = np.flatnonzero(has_text)
    if len(candidates) < k:
        raise ValueError(f"embed.fallback_neighbors={k}, but only {len(candidates)} items have text")
    unit = table_ID / np.maximum(np.linalg.norm(table_ID, axis=1, keepdims=True), 1e-12)
    cand_CD = unit[candidates]
    out = np.empty((len(missing_ids), k), dtype=np.int64)
    for lo in range(0, len(missing_ids), chunk):
        sims_MC = unit[missing_ids[lo : lo + chunk]] @ cand_CD.T
        # A stable sort of -similarity keeps the lower id first among equal scores.
        order = np.argsort(-sims_MC, axis=1, kind="stable")[:, :k]
        out[lo : lo + chunk] = candidates[order]
    return out


def read_vectors(files: list[Path], dense_ids: np.ndarray) -> dict[int, np.ndarray]:
    """The embedding vectors of ``dense_ids`` from embedding part files, streamed row group by row group."""
    wanted = set(int(i) for i in dense_ids)
    found: dict[int, np.ndarray] = {}
    for path in files:
        pf = pq.ParquetFile(path)
        for g in range(pf.num_row_groups):
            table = pf.read_row_group(g)
            ids = table["dense_id"].to_numpy()
            hit = np.flatnonzero(np.isin(ids, list(wanted))) if wanted else []
            if len(hit):
                vectors = _vectors(table)
                for j in hit:
                    found[int(ids[j])] = vectors[j]
    return found


def fallback_vectors(
    table_ID: np.ndarray, missing_ids: np.ndarray, has_text: np.ndarray, files: list[Path], k: int
) -> np.ndarray:
    """float32 [len(missing_ids), dim]: each missing item's neighbours' mean text vector, rescaled to
    their mean norm (see the module docstring)."""
    neighbours_MK = neighbours_with_text(table_ID, missing_ids, has_text, k)
    vectors = read_vectors(files, np.unique(neighbours_MK))
    stacked_MKD = np.stack([np.stack([vectors[int(i)] for i in row]) for row in neighbours_MK])
    mean_MD = stacked_MKD.mean(axis=1)
    norm = np.linalg.norm(stacked_MKD, axis=2).mean(axis=1, keepdims=True)
    return (mean_MD / np.maximum(np.linalg.norm(mean_MD, axis=1, keepdims=True), 1e-12) * norm).astype(
        np.float32
    )


def replace_vectors(
    files: list[Path], replacements: dict[int, np.ndarray], row_group_size: int
) -> list[Path]:
    """Rewrite the part files that hold any of ``replacements``' dense ids with those vectors in
    place of the old ones; returns the files rewritten."""
    changed = []
    for path in files:
        table = pq.read_table(path)
        ids = table["dense_id"].to_numpy()
        hit = [j for j, i in enumerate(ids) if int(i) in replacements]
        if not hit:
            continue
        vectors_BD = _vectors(table).copy()
        for j in hit:
            vectors_BD[j] = replacements[int(ids[j])]
        column = pa.FixedSizeListArray.from_arrays(
            pa.array(vectors_BD.reshape(-1), pa.float32()), vectors_BD.shape[1]
        )
        table = table.set_column(table.schema.get_field_index("embedding"), "embedding", column)
        pq.write_table(table, path, compression="zstd", row_group_size=row_group_size)
        changed.append(path)
    return changed


def _vectors(table: pa.Table) -> np.ndarray:
    column = table["embedding"].combine_chunks()
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, column.type.list_size
    )
