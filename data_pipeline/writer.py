"""Writing the prepared-data directory: its lifecycle, deterministic Parquet files, the manifest.

* ``claim_output_dir``: an output directory is ours when it holds ``.prepare-output`` (written
  first by every run) or ``manifest.json``. A complete output (manifest present) is replaced only
  with ``output.overwrite=true``; an incomplete one (a killed run: marker, no manifest) is removed;
  a non-empty directory that is neither is never deleted.
* ``write_parquet``: zstd, fixed row-group size, temp file + ``os.replace``; returns the sha256.
  Same table -> same bytes.
* ``write_manifest``: last, atomically (temp file + ``os.replace``).
* ``write_arrow`` / ``read_arrow``: the job's intermediate files, uncompressed Arrow IPC read by
  memory mapping: an order of magnitude cheaper than Parquet for data written and read once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

MARKER = ".prepare-output"
MANIFEST = "manifest.json"
WORK_DIR = "_work"


def _clear(directory: Path) -> None:
    for entry in directory.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def claim_output_dir(out: Path, overwrite: bool) -> None:
    """Make ``out`` an empty output directory of this job (see the module docstring)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"output.dir '{out}' exists and is not a directory")
    if out.exists():
        if (out / MANIFEST).exists():
            if not overwrite:
                raise ValueError(
                    f"output.dir '{out}' already holds a complete prepared dataset ({MANIFEST}); "
                    "pass output.overwrite=true to replace it, or choose another output.dir"
                )
            logger.warning("output.overwrite=true: replacing the prepared data in %s", out)
            # Manifest first: if we are killed while deleting, what is left is marked incomplete.
            (out / MANIFEST).unlink()
            (out / MARKER).touch()
            _clear(out)
        elif (out / MARKER).exists():
            logger.warning("removing an incomplete output of an earlier run (no %s) in %s", MANIFEST, out)
            _clear(out)
        elif any(out.iterdir()):
            raise ValueError(
                f"output.dir '{out}' is not empty and was not written by this job (no {MARKER} or "
                f"{MANIFEST}); refusing to delete its contents. Choose a new or empty directory"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(
        "Written by `python -m data_pipeline prepare`. Without manifest.json this directory is incomplete.\n"
    )


def sha256_file(path: str | os.PathLike, block_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(
    table: pa.Table,
    path: str | os.PathLike,
    row_group_size: int,
    compression: str = "zstd",
    schema: pa.Schema | None = None,
    use_dictionary: bool | list[str] = True,
) -> str:
    """Write ``table`` atomically; returns the file's sha256. ``use_dictionary``: True, or the
    column paths (``name``, ``name.list.element``) that get dictionary encoding."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if schema is not None:
        table = table.cast(schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(
        table, tmp, compression=compression, row_group_size=row_group_size, use_dictionary=use_dictionary
    )
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def write_arrow(table: pa.Table, path: str | os.PathLike) -> None:
    """Write an intermediate table as an Arrow IPC file (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with pa.ipc.new_file(tmp, table.schema) as writer:
        writer.write_table(table)
    os.replace(tmp, path)


def read_arrow(path: str | os.PathLike) -> pa.Table:
    """Read an Arrow IPC file without copying (memory-mapped; pages load when touched)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def write_json_atomic(data: dict[str, Any], path: str | os.PathLike) -> None:
    """JSON with sorted keys, written to a temp file then renamed into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` (the completion marker): call it last."""
    write_json_atomic(manifest, out / MANIFEST)


def fingerprint_inputs(paths: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """sha256 over each input file's name, size and content hash, in input order."""
    digest = hashlib.sha256()
    files = []
    for p in paths:
        size = os.path.getsize(p)
        content = sha256_file(p)
        digest.update(f"{os.path.basename(p)}\0{size}\0{content}\n".encode())
        files.append({"path": p, "size": size, "sha256": content})
    return digest.hexdigest(), files
