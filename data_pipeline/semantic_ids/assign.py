"""Item embeddings + trained RQ-VAE -> the semantic-ID table (unique codes for every item).

    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml stages=[assign]

1. encode   the embedding files are read ``assign.batch_size`` rows at a time and encoded to L codes
            per item; only the codes (N x L int64) are kept, so memory is ~24 bytes per item plus one
            batch, and the vectors are never all in memory. The reconstruction error
            of the first ``assign.recon_rows`` items is measured on the way.
2. resolve  TIGER's collision token (``table.add_collision_token``): items with equal L codes get
            0, 1, 2, ... in dense-id order as an extra level, so every ID is unique. Deterministic: the
            same embeddings and the same seed (hence the same model) give the same IDs.
3. write    ``<output_dir>/semantic_ids/`` (format semantic_ids/v1, keyed by the RAW item id of the
            prepared data's vocab/items.parquet) and metrics to MLflow, in the RQ-VAE's run:
            ``assign/recon``, ``assign/usage_l{l}``, ``assign/perplexity_l{l}``,
            ``assign/collision_rate`` (share of items whose L codes another item shares, before the
            extra token), ``assign/max_collision_group``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from data_pipeline.semantic_ids.config import SemanticIdConfig
from data_pipeline.semantic_ids.rqvae import RqVae
from data_pipeline.semantic_ids.train_rqvae import (
    MODEL_FILE,
    RQVAE_DIR,
    _to_numpy,
    embedding_files,
    load_model,
)

logger = logging.getLogger(__name__)

TABLE_DIR = "semantic_ids"


@torch.no_grad()
def encode_files(
    model: RqVae, files: list[Path], num_items: int, batch_size: int, recon_rows: int | None = None
) -> tuple[np.ndarray, float]:
    """Codes int64 [num_items, L] of the embedding files' rows (in file order) and the mean squared
    reconstruction error per element over the first ``recon_rows`` of them (None: all). Streams
    ``batch_size`` rows at a time."""
    L = model.shape.num_levels
    codes_NL = np.empty((num_items, L), dtype=np.int64)
    sq_err, num_values, row = 0.0, 0, 0
    for path in files:
        for batch in _row_group_batches(path, batch_size):
            x_BD = torch.from_numpy(np.array(_to_numpy(batch)))  # a writable copy of Arrow's read-only buffer
            z_BE = model.encode(x_BD)
            c_BL, _, chosen_BLE = model.quantizer.residuals(z_BE)
            if recon_rows is None or row < recon_rows:  # the decoder doubles the cost: a sample suffices
                x_hat_BD = model.decoder(chosen_BLE.sum(1))
                sq_err += float((x_hat_BD - x_BD).pow(2).sum(dtype=torch.float64))
                num_values += x_BD.numel()
            if row + len(c_BL) > num_items:
                raise ValueError(
                    f"the embedding files hold more than the {num_items} rows their manifest states"
                )
            codes_NL[row : row + len(c_BL)] = c_BL.numpy()
            row += len(c_BL)
    if row != num_items:
        raise ValueError(f"the embedding files hold {row} rows, their manifest states {num_items}")
    return codes_NL, sq_err / max(num_values, 1)


def _row_group_batches(path: Path, batch_size: int):
    """Tables of whole row groups, about ``batch_size`` rows each, read one at a time.

    Not ``ParquetFile.iter_batches``: it reads ahead and held ~2 GiB for a 1.5 GiB file here, which
    grows with the file; reading row groups explicitly keeps memory at one batch."""
    pf = pq.ParquetFile(path)
    groups: list[int] = []
    rows = 0
    for g in range(pf.num_row_groups):
        groups.append(g)
        rows += pf.metadata.row_group(g).num_rows
        if rows >= batch_size or g == pf.num_row_groups - 1:
            yield pf.read_row_groups(groups, columns=["embedding"])
            groups, rows = [], 0


def code_statistics(codes_NL: np.ndarray, codebook_size: int) -> dict[str, float]:
    """Per level: ``usage_l{l}`` (share of the codebook used by some item) and ``perplexity_l{l}``
    (exp of the entropy of the items' code distribution; K when uniform, 1 when collapsed)."""
    out = {}
    for level in range(codes_NL.shape[1]):
        counts = np.bincount(codes_NL[:, level], minlength=codebook_size).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        out[f"usage_l{level}"] = float((counts > 0).mean())
        out[f"perplexity_l{level}"] = float(np.exp(-(p * np.log(p)).sum()))
    return out


def raw_item_ids(data_dir: Path, num_items: int) -> np.ndarray:
    """Raw item ids in dense-id order (object array of str), checked against ``num_items``."""
    path = data_dir / "vocab" / "items.parquet"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: data_dir must be a prepared data directory")
    vocab = pq.read_table(path, columns=["raw_id", "dense_id"]).sort_by("dense_id")
    dense = vocab["dense_id"].to_numpy()
    if len(dense) != num_items or not np.array_equal(dense, np.arange(1, num_items + 1)):
        raise ValueError(
            f"{path} has {len(dense)} items (dense ids {dense[:1].tolist()}..{dense[-1:].tolist()}) but the embeddings "
            f"hold {num_items}: they were made from another prepared directory; re-run the embed stage"
        )
    return np.asarray(vocab["raw_id"].to_pylist(), dtype=object)


def assign_ids(cfg: SemanticIdConfig) -> dict[str, Any]:
    """Run the assign stage; returns its metrics (and writes the table)."""
    from data_pipeline.semantic_ids.table import SemanticIdTable, add_collision_token, write_semantic_ids
    from train.tracking import make_tracker

    t0 = time.perf_counter()
    out = Path(cfg.output_dir).resolve()
    table_manifest = out / TABLE_DIR / "manifest.json"
    if table_manifest.is_file():
        if not cfg.overwrite:
            raise ValueError(
                f"{out / TABLE_DIR} already holds semantic ids; pass overwrite=true to replace them"
            )
        table_manifest.unlink()  # first: a half-replaced table must not look complete
    files, emb_manifest = embedding_files(out)
    num_items = int(emb_manifest["num_items"])
    item_ids = raw_item_ids(Path(cfg.data_dir).resolve(), num_items)
    model = load_model(out / RQVAE_DIR / MODEL_FILE)
    codes_NL, recon = encode_files(model, files, num_items, cfg.assign.batch_size, cfg.assign.recon_rows)
    t_encode = time.perf_counter() - t0
    stats = code_statistics(codes_NL, model.shape.codebook_size)
    codes_NL1, collision_rate = add_collision_token(codes_NL)
    max_group = int(codes_NL1[:, -1].max()) + 1 if num_items else 0
    sizes = [model.shape.codebook_size] * model.shape.num_levels + [max_group]
    table = SemanticIdTable(
        item_ids=item_ids,
        codes=codes_NL1,
        codebook_sizes=sizes,
        manifest={
            "source": "rqvae",
            "seed": cfg.seed,
            "collision_rate": collision_rate,
            "embedding_model": emb_manifest["model"],
            "embedding_fields": emb_manifest["fields"],
            "embeddings_sha256": emb_manifest["sha256"],
            "rqvae": {k: v for k, v in vars(model.shape).items()} | {"gradient": model.gradient},
            "recon_mse": recon,
            **{k: v for k, v in stats.items()},
        },
    )
    path = write_semantic_ids(out / TABLE_DIR, table)
    metrics = {
        "assign/recon": recon,
        "assign/collision_rate": collision_rate,
        "assign/max_collision_group": float(max_group),
        **{f"assign/{k}": v for k, v in stats.items()},
        "assign/seconds_encode": t_encode,
        "assign/seconds": time.perf_counter() - t0,
    }
    # The RQ-VAE's run directory holds its MLflow run id, so these land in the same run.
    tracker = make_tracker(
        cfg.tracking, rank=0, run_dir=out / RQVAE_DIR, default_uri=f"sqlite:///{out}/mlflow.db"
    )
    tracker.log_metrics(metrics, cfg.rqvae.num_steps)
    tracker.finish()
    logger.info(
        "assign: %s items, usage %s, perplexity %s, collision rate %.4f (largest group %d), recon %.5f -> %s",
        f"{num_items:,}",
        [round(stats[f"usage_l{lv}"], 3) for lv in range(model.shape.num_levels)],
        [round(stats[f"perplexity_l{lv}"], 1) for lv in range(model.shape.num_levels)],
        collision_rate,
        max_group,
        recon,
        path,
    )
    return metrics
