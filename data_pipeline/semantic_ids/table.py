"""The semantic-ID table: one fixed-length code tuple per item, on disk and in memory.

On disk (format ``semantic_ids/v1``)::

    <dir>/semantic_ids.parquet   item_id (string: the RAW item id, as ``raw_id`` in a prepared data
                                 dir's vocab/items.parquet), codes (list<int32>, the same length L
                                 on every row)
    <dir>/manifest.json          {"format": "semantic_ids/v1", "num_items", "num_levels": L,
                                  "codebook_sizes": [one per level], "source", "seed",
                                  "collision_rate", "sha256": of the parquet file, ...}

The parquet file is written first and the manifest last, each to a temporary name and then renamed,
so a directory with a manifest holds a complete table and a half-written one has none.

The last level is usually the collision-resolution token of TIGER: items whose first L-1 codes are
equal get 0, 1, 2, ... there (in row order), so every item's tuple is unique, which generative
retrieval needs to map a decoded tuple back to one item. ``collision_rate`` is the share of items
that share their first L-1 codes with another item (null when unknown).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

logger = logging.getLogger(__name__)

FORMAT = "semantic_ids/v1"
PARQUET_NAME = "semantic_ids.parquet"
MANIFEST_NAME = "manifest.json"
REQUIRED_MANIFEST_KEYS = ("format", "num_items", "num_levels", "codebook_sizes", "sha256")


@dataclass
class SemanticIdTable:
    """Items and their semantic IDs: ``codes[i]`` is the tuple of item ``item_ids[i]``.

    ``item_ids``: object array of str, shape [N] (raw item ids). ``codes``: int64, shape [N, L].
    ``codebook_sizes``: L ints, level l's codes lie in [0, codebook_sizes[l]).
    ``manifest``: the manifest read from disk, or the extra keys to write (source, seed, ...).
    """

    item_ids: np.ndarray
    codes: np.ndarray
    codebook_sizes: list[int]
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def num_items(self) -> int:
        return int(self.codes.shape[0])

    @property
    def num_levels(self) -> int:
        return int(self.codes.shape[1])

    def validate(self, where: str = "semantic-ID table") -> None:
        """Raise ValueError (naming ``where`` and the offending item) unless the table is well formed:
        2-D codes with one row per item, codes within their codebooks, unique item ids, unique tuples."""
        codes = self.codes
        if codes.ndim != 2 or codes.shape[1] < 1:
            raise ValueError(
                f"{where}: codes must be a 2-D [num_items, num_levels] array, got shape {codes.shape}"
            )
        if len(self.item_ids) != codes.shape[0]:
            raise ValueError(
                f"{where}: {len(self.item_ids)} item ids but {codes.shape[0]} code rows; give one code tuple per item"
            )
        if len(self.codebook_sizes) != codes.shape[1]:
            raise ValueError(
                f"{where}: {len(self.codebook_sizes)} codebook sizes for {codes.shape[1]} levels; "
                "give one codebook size per level"
            )
        for i, item in enumerate(self.item_ids):
            if not isinstance(item, str) or not item:
                raise ValueError(f"{where}: row {i} has item id {item!r}; item ids must be non-empty strings")
        for level, size in enumerate(self.codebook_sizes):
            column = codes[:, level]
            bad = np.flatnonzero((column < 0) | (column >= size))
            if bad.size:
                row = int(bad[0])
                raise ValueError(
                    f"{where}: item {self.item_ids[row]!r} (row {row}) has code {int(column[row])} at level "
                    f"{level}, outside its codebook [0, {size}) ({bad.size} such rows); fix the codes or the "
                    "codebook_sizes"
                )
        ids_sorted = np.sort(self.item_ids.astype(str))
        dup = np.flatnonzero(ids_sorted[1:] == ids_sorted[:-1])
        if dup.size:
            raise ValueError(
                f"{where}: item id {str(ids_sorted[dup[0]])!r} appears more than once ({dup.size} duplicated rows); "
                "give each item one row"
            )
        first, second = _first_duplicate_tuple(codes)
        if first >= 0:
            raise ValueError(
                f"{where}: items {self.item_ids[first]!r} (row {first}) and {self.item_ids[second]!r} (row "
                f"{second}) have the same codes {codes[first].tolist()}; semantic IDs must be unique: append a "
                "collision token (add_collision_token)"
            )


def _first_duplicate_tuple(codes_NL: np.ndarray) -> tuple[int, int]:
    """Rows (i, j) of the first pair of equal tuples found, or (-1, -1) when all tuples are unique."""
    if codes_NL.shape[0] < 2:
        return -1, -1
    order = _lexsort_rows(codes_NL)
    sorted_NL = codes_NL[order]
    same = np.flatnonzero(np.all(sorted_NL[1:] == sorted_NL[:-1], axis=1))
    if not same.size:
        return -1, -1
    pair = sorted((int(order[same[0]]), int(order[same[0] + 1])))
    return pair[0], pair[1]


def _lexsort_rows(codes_NL: np.ndarray) -> np.ndarray:
    """Row order sorting the tuples lexicographically, ties kept in row order (stable)."""
    # np.lexsort sorts by its LAST key first, so list the row index (tie-breaker) first, level 0 last.
    keys = [np.arange(codes_NL.shape[0])] + [
        codes_NL[:, level] for level in reversed(range(codes_NL.shape[1]))
    ]
    return np.lexsort(keys)


def add_collision_token(codes_NL: np.ndarray) -> tuple[np.ndarray, float]:
    """Append TIGER's collision-resolution token: items with equal tuples get 0, 1, 2, ... in row order.

    Deterministic: callers put rows in item-id order first, so the k-th item (by id) sharing a tuple
    gets token k. Returns ``(codes [N, L+1], collision_rate)`` where collision_rate is the share of
    items whose L input codes are shared with at least one other item. The new level's codebook size
    is ``codes[:, -1].max() + 1`` (the largest group).
    """
    codes_NL = np.asarray(codes_NL, dtype=np.int64)
    if codes_NL.ndim != 2:
        raise ValueError(
            f"add_collision_token: codes must be 2-D [num_items, num_levels], got shape {codes_NL.shape}"
        )
    n = codes_NL.shape[0]
    token_N = np.zeros(n, dtype=np.int64)
    if n == 0:
        return np.concatenate([codes_NL, token_N[:, None]], axis=1), 0.0
    order = _lexsort_rows(codes_NL)
    sorted_NL = codes_NL[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = np.any(sorted_NL[1:] != sorted_NL[:-1], axis=1)
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    token_N[order] = np.arange(n) - group_start
    group_id = np.cumsum(new_group) - 1
    group_size = np.bincount(group_id)
    num_colliding = int(group_size[group_size > 1].sum())
    return np.concatenate([codes_NL, token_N[:, None]], axis=1), num_colliding / n


def random_semantic_ids(
    item_ids, num_levels: int = 3, codebook_size: int = 256, seed: int = 0
) -> SemanticIdTable:
    """A trivial baseline tokenizer: ``num_levels`` uniform random codes plus a collision token.

    Rows are sorted by item id (string order) before drawing, so the IDs depend only on the set of
    items and the seed, not on the input order. The result has ``num_levels + 1`` levels.
    """
    if num_levels < 1 or codebook_size < 1:
        raise ValueError(
            f"random_semantic_ids: num_levels={num_levels} and codebook_size={codebook_size} must be >= 1"
        )
    ids = np.array(sorted(str(i) for i in item_ids), dtype=object)
    rng = np.random.default_rng(seed)
    codes_NL = rng.integers(0, codebook_size, size=(len(ids), num_levels), dtype=np.int64)
    codes_NL, rate = add_collision_token(codes_NL)
    sizes = [codebook_size] * num_levels + [int(codes_NL[:, -1].max(initial=0)) + 1]
    manifest = {"source": "random", "seed": seed, "collision_rate": rate}
    table = SemanticIdTable(item_ids=ids, codes=codes_NL, codebook_sizes=sizes, manifest=manifest)
    table.validate("random_semantic_ids")
    return table


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_semantic_ids(out_dir, table: SemanticIdTable) -> Path:
    """Validate ``table`` and write ``<out_dir>/semantic_ids.parquet`` then ``<out_dir>/manifest.json``.

    Keys already in ``table.manifest`` (source, seed, collision_rate, anything extra) are kept; the
    format, counts, codebook sizes and checksum are set here. Returns ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    table.validate(f"semantic-ID table for {out}")
    out.mkdir(parents=True, exist_ok=True)
    codes_NL = np.ascontiguousarray(table.codes, dtype=np.int32)
    n, num_levels = codes_NL.shape
    offsets = pa.array(np.arange(0, (n + 1) * num_levels, num_levels, dtype=np.int32))
    codes_arr = pa.ListArray.from_arrays(offsets, pa.array(codes_NL.reshape(-1), pa.int32()))
    arrow = pa.table({"item_id": pa.array(table.item_ids.tolist(), pa.string()), "codes": codes_arr})
    parquet_path = out / PARQUET_NAME
    tmp = out / f".{PARQUET_NAME}.tmp"
    pq.write_table(arrow, tmp, compression="zstd")
    os.replace(tmp, parquet_path)

    manifest = {"source": "unknown", "seed": None, "collision_rate": None, **table.manifest}
    manifest.update(
        format=FORMAT,
        num_items=int(n),
        num_levels=int(num_levels),
        codebook_sizes=[int(s) for s in table.codebook_sizes],
        sha256=_sha256(parquet_path),
    )
    tmp = out / f".{MANIFEST_NAME}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST_NAME)
    return out


def read_semantic_ids(dir) -> SemanticIdTable:
    """Read and validate a semantic-ID directory written by ``write_semantic_ids``.

    Raises ValueError naming the file, the row or item, and what to do, when a file is missing, the
    checksum does not match, rows have different lengths, a code is outside its codebook, or item ids
    or code tuples repeat.
    """
    root = Path(dir)
    manifest_path = root / MANIFEST_NAME
    parquet_path = root / PARQUET_NAME
    if not manifest_path.is_file():
        raise ValueError(
            f"{manifest_path} not found: {root} is not a (complete) semantic-ID directory; write it with "
            "`python -m data_pipeline semantic-ids` or `semantic-ids-reference`"
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{manifest_path} is not valid JSON ({exc}); write the directory again") from exc
    missing = [k for k in REQUIRED_MANIFEST_KEYS if k not in manifest]
    if missing:
        raise ValueError(
            f"{manifest_path} lacks the keys {missing}; write the directory again with write_semantic_ids"
        )
    if manifest["format"] != FORMAT:
        raise ValueError(
            f"{manifest_path}: format {manifest['format']!r}, expected {FORMAT!r}; convert or rewrite it"
        )
    if not parquet_path.is_file():
        raise ValueError(f"{parquet_path} not found (the manifest names it); write the directory again")
    checksum = _sha256(parquet_path)
    if checksum != manifest["sha256"]:
        raise ValueError(
            f"{parquet_path}: sha256 {checksum[:12]}... does not match the manifest's {manifest['sha256'][:12]}...; "
            "the file changed after it was written: write the directory again"
        )
    arrow = pq.read_table(parquet_path)
    for name in ("item_id", "codes"):
        if name not in arrow.column_names:
            raise ValueError(f"{parquet_path} has no column {name!r} (columns: {arrow.column_names})")
    ids_col = arrow["item_id"].combine_chunks()
    codes_col = arrow["codes"].combine_chunks()
    if not pa.types.is_string(ids_col.type) and not pa.types.is_large_string(ids_col.type):
        raise ValueError(
            f"{parquet_path}: column item_id has type {ids_col.type}, expected string (raw item ids)"
        )
    if not pa.types.is_list(codes_col.type) and not pa.types.is_large_list(codes_col.type):
        raise ValueError(f"{parquet_path}: column codes has type {codes_col.type}, expected list<int32>")
    for name, col in (("item_id", ids_col), ("codes", codes_col)):
        if col.null_count:
            row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise ValueError(
                f"{parquet_path}: column {name} is null at row {row}; every item needs an id and codes"
            )
    item_ids = np.array(ids_col.to_pylist(), dtype=object)
    num_levels = int(manifest["num_levels"])
    lengths = np.diff(codes_col.offsets.to_numpy())
    bad = np.flatnonzero(lengths != num_levels)
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{parquet_path}: item {item_ids[row]!r} (row {row}) has {int(lengths[row])} codes, the manifest says "
            f"num_levels={num_levels} ({bad.size} such rows); every item needs the same number of codes"
        )
    flat = codes_col.flatten()
    if flat.null_count:
        raise ValueError(
            f"{parquet_path}: column codes holds {flat.null_count} null codes; every code must be an integer"
        )
    values = flat.to_numpy(zero_copy_only=False)
    codes_NL = values.astype(np.int64).reshape(len(item_ids), num_levels)
    if len(item_ids) != int(manifest["num_items"]):
        raise ValueError(
            f"{parquet_path} has {len(item_ids)} rows, the manifest says num_items={manifest['num_items']}; "
            "write the directory again"
        )
    table = SemanticIdTable(
        item_ids=item_ids,
        codes=codes_NL,
        codebook_sizes=[int(s) for s in manifest["codebook_sizes"]],
        manifest=manifest,
    )
    table.validate(str(parquet_path))
    return table


_REFERENCE_TOKEN = re.compile(r"^<([a-z])_(\d+)>$")


def convert_reference(json_path, out_dir, prepared_dir=None) -> SemanticIdTable:
    """Convert a published semantic-ID JSON (``../shared/data/amazon-beauty/reference_semantic_ids.json``).

    The file maps ``item id - 1`` (string) to a list of tokens ``"<a_183>", "<b_70>", ...`` (letter =
    level, number = code). Item ids of the Amazon Beauty files start at 1 and become the prepared
    data's ``raw_id`` as written (``item_id`` column of interactions.tsv), so the raw id is
    ``str(key + 1)``. The reference tuples are not all unique, so a collision token is appended (as in
    TIGER), giving one more level. A level's codebook size is its largest code + 1 (the file does not
    state it). With ``prepared_dir``, every item in its ``vocab/items.parquet`` must have codes, else
    ValueError with the count. Writes ``out_dir`` and returns the table read back from it.
    """
    json_path = Path(json_path)
    try:
        raw = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(
            f"cannot read {json_path} ({exc}); pass the reference_semantic_ids.json file"
        ) from exc
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{json_path}: expected a non-empty JSON object {{item id - 1: [tokens]}}")
    rows: list[tuple[int, list[int]]] = []
    num_levels = None
    for key, tokens in raw.items():
        if not key.isdigit():
            raise ValueError(f"{json_path}: key {key!r} is not a non-negative integer (item id - 1)")
        if not isinstance(tokens, list) or not tokens:
            raise ValueError(
                f"{json_path}: key {key!r} maps to {tokens!r}, expected a list of tokens like '<a_12>'"
            )
        if num_levels is None:
            num_levels = len(tokens)
        if len(tokens) != num_levels:
            raise ValueError(
                f"{json_path}: key {key!r} has {len(tokens)} tokens, the first key has {num_levels}"
            )
        codes = []
        for level, token in enumerate(tokens):
            match = _REFERENCE_TOKEN.match(str(token))
            if not match or match.group(1) != chr(ord("a") + level):
                raise ValueError(
                    f"{json_path}: key {key!r} token {level} is {token!r}, expected '<{chr(ord('a') + level)}_N>'"
                )
            codes.append(int(match.group(2)))
        rows.append((int(key), codes))
    rows.sort()  # item-id order, so the collision token is assigned in a documented, deterministic order
    item_ids = np.array([str(k + 1) for k, _ in rows], dtype=object)
    ref_codes_NL = np.array([c for _, c in rows], dtype=np.int64)
    num_unique = len({tuple(r) for r in ref_codes_NL.tolist()})
    codes_NL, rate = add_collision_token(ref_codes_NL)
    sizes = [int(s) + 1 for s in codes_NL.max(axis=0)]
    manifest: dict[str, Any] = {
        "source": f"reference:{json_path}",
        "seed": None,
        "collision_rate": rate,
        "reference_num_levels": num_levels,
        "reference_num_unique_tuples": num_unique,
    }
    if prepared_dir is not None:
        vocab_path = Path(prepared_dir) / "vocab" / "items.parquet"
        if not vocab_path.is_file():
            raise ValueError(
                f"{vocab_path} not found; pass a prepared data dir (python -m data_pipeline prepare)"
            )
        prepared_ids = pq.read_table(vocab_path, columns=["raw_id"])["raw_id"].to_pylist()
        known = set(item_ids.tolist())
        missing = [r for r in prepared_ids if r not in known]
        if missing:
            raise ValueError(
                f"{len(missing)} of the {len(prepared_ids)} items in {vocab_path} have no codes in {json_path} "
                f"(e.g. raw ids {missing[:5]}); the reference must come from the same item ids (Amazon Beauty, "
                "S3-Rec/P5 numbering)"
            )
        manifest["prepared_dir"] = str(prepared_dir)
        manifest["num_items_not_prepared"] = len(known) - len(set(prepared_ids))
        logger.info(
            "all %d prepared items have codes; %d reference items are not in the prepared data",
            len(prepared_ids),
            manifest["num_items_not_prepared"],
        )
    table = SemanticIdTable(item_ids=item_ids, codes=codes_NL, codebook_sizes=sizes, manifest=manifest)
    write_semantic_ids(out_dir, table)
    return read_semantic_ids(out_dir)
