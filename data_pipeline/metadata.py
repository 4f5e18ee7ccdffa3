"""Item side information -> ``items/metadata.parquet`` (dense_id, title, brand, categories, description).

Read in the driver: one record per item, small next to the interaction log. Accepted files:

* JSON mapping ``{raw_id: {title, brand, categories, description}}`` (e.g. Yelp ``items.json``,
  keyed by item id minus 1: set ``input.item_metadata_key_offset: 1``);
* JSON lines / a JSON list of records with an id field (``input.item_metadata_id_field``, default
  the first of item, item_id, asin, id, movieId); Python-literal lines (old Amazon ``meta_*.json``)
  are accepted too;
* JSON mapping ``{raw_id: [attribute id, ...]}`` (S3-Rec Amazon ``item_attributes.json``) with
  ``input.item_metadata_attribute_names`` naming a JSON file whose ``id2attribute`` maps the ids to
  names (``datamaps.json``): the names, in the file's order, become ``categories``;
* CSV with a header and an id column;
* MovieLens ``u.item``, ``movies.dat``, ``movies.csv`` (title; genres become categories).

``categories`` may be a string, a list, or a list of lists (Amazon); it is flattened to a list of
strings. Items of the vocabulary without metadata get nulls; the count is in the manifest.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import os
from typing import Any

import pyarrow as pa

from data_pipeline.config import InputConfig

ID_FIELDS = ("item", "item_id", "asin", "id", "movieId")
TEXT_FIELDS = ("title", "brand", "description")

_ML100K_GENRES = (
    "unknown|Action|Adventure|Animation|Children's|Comedy|Crime|Documentary|Drama|Fantasy|Film-Noir|"
    "Horror|Musical|Mystery|Romance|Sci-Fi|Thriller|War|Western"
).split("|")


def _read_text(path: str) -> str:
    with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as f:  # noqa: SIM115
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # MovieLens 100K / 1M files are ISO-8859-1


def _categories(value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    out: list[str] = []
    for v in value:
        if isinstance(v, (list, tuple)):
            out.extend(str(x) for x in v)
        elif v is not None:
            out.append(str(v))
    return out


def _record(raw: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for key in TEXT_FIELDS:
        value = raw.get(key)
        rec[key] = None if value is None else value if isinstance(value, str) else " ".join(map(str, value))
    rec["categories"] = _categories(raw.get("categories", raw.get("category")))
    return rec


def _movielens(path: str, text: str) -> dict[str, dict[str, Any]] | None:
    name = os.path.basename(path).removesuffix(".gz")
    out: dict[str, dict[str, Any]] = {}
    if name == "u.item":
        genre_file = os.path.join(os.path.dirname(path), "u.genre")
        genres = list(_ML100K_GENRES)
        if os.path.exists(genre_file):
            pairs = [line.split("|") for line in _read_text(genre_file).splitlines() if "|" in line]
            genres = [g for g, _ in sorted(pairs, key=lambda p: int(p[1]))]
        for line in text.splitlines():
            parts = line.split("|")
            if len(parts) < 5:
                continue
            flags = parts[5:]
            cats = [genres[i] for i, f in enumerate(flags) if f.strip() == "1" and i < len(genres)]
            out[parts[0]] = {"title": parts[1], "brand": None, "categories": cats, "description": None}
        return out
    if name == "movies.dat":
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 3:
                out[parts[0]] = {
                    "title": parts[1],
                    "brand": None,
                    "categories": parts[2].split("|"),
                    "description": None,
                }
        return out
    if name == "movies.csv":
        for row in csv.DictReader(io.StringIO(text)):
            out[row["movieId"]] = {
                "title": row["title"],
                "brand": None,
                "categories": row["genres"].split("|"),
                "description": None,
            }
        return out
    return None


def _id_field(record: dict[str, Any], configured: str | None, path: str) -> str:
    if configured is not None:
        if configured not in record:
            raise ValueError(
                f"item metadata '{path}': records have no field '{configured}' (input.item_metadata_id_field); "
                f"fields found: {sorted(record)}"
            )
        return configured
    for name in ID_FIELDS:
        if name in record:
            return name
    raise ValueError(
        f"item metadata '{path}': no id field among {list(ID_FIELDS)}; fields found: {sorted(record)}. "
        "Set input.item_metadata_id_field"
    )


def _attribute_names(path: str | None, metadata_path: str) -> dict[str, str]:
    if path is None:
        raise ValueError(
            f"item metadata '{metadata_path}' maps items to lists of attribute ids; set "
            "input.item_metadata_attribute_names to the JSON file whose id2attribute names them (datamaps.json)"
        )
    if not os.path.isfile(path):
        raise ValueError(f"input.item_metadata_attribute_names: file '{path}' does not exist")
    try:
        names = json.loads(_read_text(path)).get("id2attribute")
    except (ValueError, AttributeError):
        names = None
    if not isinstance(names, dict):
        raise ValueError(
            f"input.item_metadata_attribute_names: '{path}' is not a JSON object with an id2attribute mapping"
        )
    return {str(k): str(v) for k, v in names.items()}


def _attribute_records(
    path: str, parsed: dict[str, list[Any]], names_path: str | None
) -> dict[str, dict[str, Any]]:
    names = _attribute_names(names_path, path)
    out = {}
    for key, ids in parsed.items():
        cats = []
        for a in ids:
            if str(a) not in names:
                raise ValueError(
                    f"item metadata '{path}': item {key!r} has attribute id {a!r}, which id2attribute in "
                    f"'{names_path}' does not name; use the attribute file of the same data set"
                )
            cats.append(names[str(a)])
        out[str(key)] = {"title": None, "brand": None, "categories": cats, "description": None}
    return out


def _records(
    path: str, text: str, id_field: str | None, attribute_names: str | None = None
) -> dict[str, dict[str, Any]]:
    base = path.removesuffix(".gz")
    if base.endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows:
            raise ValueError(f"item metadata '{path}' has no rows")
        key = _id_field(rows[0], id_field, path)
        return {row[key]: _record(row) for row in rows}
    stripped = text.lstrip()
    parsed: Any = None
    if stripped.startswith(("{", "[")):
        try:
            parsed = json.loads(text)
        except ValueError:
            parsed = None  # JSON lines
    if isinstance(parsed, dict):
        if parsed and all(isinstance(v, list) for v in parsed.values()):
            return _attribute_records(path, parsed, attribute_names)
        return {str(k): _record(v) for k, v in parsed.items() if isinstance(v, dict)}
    if isinstance(parsed, list):
        records = [r for r in parsed if isinstance(r, dict)]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                try:
                    record = ast.literal_eval(line)
                except (ValueError, SyntaxError):
                    raise ValueError(
                        f"item metadata '{path}' line {number} is not JSON: {line[:200]!r}"
                    ) from None
            if isinstance(record, dict):
                records.append(record)
    if not records:
        raise ValueError(f"item metadata '{path}' has no records")
    key = _id_field(records[0], id_field, path)
    return {str(r[key]): _record(r) for r in records if key in r}


def read_item_metadata(cfg: InputConfig) -> dict[str, dict[str, Any]]:
    """raw item id -> {title, brand, categories, description} from ``cfg.item_metadata``."""
    assert cfg.item_metadata is not None
    path = cfg.item_metadata
    if not os.path.isfile(path):
        raise ValueError(
            f"input.item_metadata: file '{path}' does not exist (relative paths resolve against {os.getcwd()})"
        )
    text = _read_text(path)
    out = _movielens(path, text)
    if out is None:
        out = _records(path, text, cfg.item_metadata_id_field, cfg.item_metadata_attribute_names)
    if cfg.item_metadata_key_offset:
        shifted = {}
        for key, value in out.items():
            try:
                shifted[str(int(key) + cfg.item_metadata_key_offset)] = value
            except ValueError:
                raise ValueError(
                    f"item metadata '{path}': key {key!r} is not an integer but input.item_metadata_key_offset "
                    f"is {cfg.item_metadata_key_offset}"
                ) from None
        out = shifted
    return out


def metadata_table(item_raw_ids: pa.Array, metadata: dict[str, dict[str, Any]]) -> tuple[pa.Table, int]:
    """One row per item of the vocabulary (dense ids 1..n, in order); returns the table and how many
    items had metadata."""
    raw_ids = item_raw_ids.to_pylist()
    rows = [metadata.get(r) for r in raw_ids]
    empty: dict[str, Any] = {"title": None, "brand": None, "categories": None, "description": None}
    table = pa.table(
        {
            "dense_id": pa.array(range(1, len(raw_ids) + 1), pa.int64()),
            "title": pa.array([(r or empty)["title"] for r in rows], pa.string()),
            "brand": pa.array([(r or empty)["brand"] for r in rows], pa.string()),
            "categories": pa.array([(r or empty)["categories"] for r in rows], pa.list_(pa.string())),
            "description": pa.array([(r or empty)["description"] for r in rows], pa.string()),
        }
    )
    return table, sum(r is not None for r in rows)
