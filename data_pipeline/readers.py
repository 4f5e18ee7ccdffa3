"""Input readers: which files to read, how to cut them into read tasks, and how one task turns its
bytes into raw interaction fields.

The driver calls ``resolve_sources`` (globs, format presets, header checks: every user mistake is a
``ValueError`` naming the file) and ``plan_read_tasks``. A read task calls ``read_records`` and gets
Arrow tables of raw fields, one per piece of at most ``read_chunk_bytes``: no per-row Python on this
path, except to locate the bad lines of a piece that cannot be parsed as a whole (invalid UTF-8,
malformed JSON).

Every record carries ``src`` (file index) and ``pos`` (byte offset of its line in the decompressed
file, or row index for Parquet): ``(src, pos)`` is the file-then-row order that breaks timestamp ties.
``line`` is the record's 0-based line index within its read task; the driver turns it into a 1-based
row number of the file once it knows how many lines the earlier tasks of that file had.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from data_pipeline.config import InputConfig

logger = logging.getLogger(__name__)

# Fields of an interaction, in output order.
FIELDS = ("user", "item", "timestamp", "rating", "event")

# MovieLens files, detected by name: (delimiter, has_header, {field: position or name}).
_ML_RATINGS_DAT = ("::", False, {"user": 0, "item": 1, "rating": 2, "timestamp": 3})
_ML_U_DATA = ("\t", False, {"user": 0, "item": 1, "rating": 2, "timestamp": 3})
_ML_RATINGS_CSV = (
    ",",
    True,
    {"user": "userId", "item": "movieId", "rating": "rating", "timestamp": "timestamp"},
)
# Amazon ratings-only CSV (user,item,rating,timestamp, no header) and review JSON lines.
_AMAZON_CSV = (",", False, {"user": 0, "item": 1, "rating": 2, "timestamp": 3})
_AMAZON_JSON_FIELDS = {
    "user": "reviewerID",
    "item": "asin",
    "rating": "overall",
    "timestamp": "unixReviewTime",
}


@dataclass(frozen=True)
class SourceFile:
    """One input file and how to read it (resolved in the driver, shipped to read tasks)."""

    index: int
    path: str  # as given (messages, rejects)
    kind: str  # "text", "jsonl", "parquet" or "sequences"
    fields: dict[str, int | str] = field(default_factory=dict)  # text: positions; others: names
    delimiter: str = ","
    has_header: bool = False
    num_columns: int = 0  # text: expected fields per line
    strip_quotes: bool = False
    compressed: bool = False
    size: int = 0
    location: str = ""  # absolute path: Ray workers may run in another working directory


@dataclass(frozen=True)
class ReadTask:
    """A byte range [start, end) of a text file (lines starting in it), or a row-group range of a
    Parquet file. ``end`` is -1 for "to the end" (compressed files are read by one task)."""

    task_id: int
    file_index: int
    start: int
    end: int


def _expand(paths: list[str]) -> list[str]:
    out: list[str] = []
    for i, pattern in enumerate(paths):
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise ValueError(
                    f"input.paths[{i}]: the pattern '{pattern}' matches no file "
                    f"(relative paths resolve against the working directory {os.getcwd()})"
                )
            out.extend(matches)
        else:
            if not os.path.exists(pattern):
                raise ValueError(
                    f"input.paths[{i}]: file '{pattern}' does not exist "
                    f"(relative paths resolve against the working directory {os.getcwd()})"
                )
            if os.path.isdir(pattern):
                raise ValueError(
                    f"input.paths[{i}]: '{pattern}' is a directory; list files or a glob such as '{pattern}/*.csv'"
                )
            out.append(pattern)
    seen: set[str] = set()
    for p in out:
        real = os.path.realpath(p)
        if real in seen:
            raise ValueError(f"input.paths: file '{p}' is listed twice; its rows would be counted twice")
        seen.add(real)
    return out


def _open_binary(path: str) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")  # noqa: SIM115


def _first_line(path: str) -> str:
    with _open_binary(path) as f:
        raw = f.readline(1 << 20)
    try:
        return raw.decode("utf-8").rstrip("\r\n").lstrip("\ufeff")
    except UnicodeDecodeError:
        raise ValueError(f"input file '{path}': the first line is not valid UTF-8") from None


def _split_header(line: str, delimiter: str, strip_quotes: bool) -> list[str]:
    names = [name.strip() for name in line.split(delimiter)]
    if strip_quotes:
        names = [n[1:-1] if len(n) >= 2 and n[0] == n[-1] == '"' else n for n in names]
    return names


def _movielens_layout(path: str) -> tuple[str, bool, dict[str, int | str]]:
    name = os.path.basename(path).removesuffix(".gz")
    if name == "ratings.dat":
        return _ML_RATINGS_DAT
    if name == "ratings.csv":
        return _ML_RATINGS_CSV
    if name == "u.data" or name.endswith((".base", ".test")):
        return _ML_U_DATA
    raise ValueError(
        f"input file '{path}': not a MovieLens ratings file I know; expected u.data (100K), ratings.dat "
        "(1M, 10M) or ratings.csv (20M, 25M, 32M). For other layouts use input.format=csv/tsv with input.columns"
    )


def _text_source(
    index: int,
    path: str,
    delimiter: str,
    has_header: bool,
    columns: dict[str, int | str],
    num_columns: int | None,
) -> SourceFile:
    strip_quotes = delimiter == ","
    first = _first_line(path)
    if has_header:
        names = _split_header(first, delimiter, strip_quotes)
        positions: dict[str, int | str] = {}
        for name, col in columns.items():
            if isinstance(col, int):
                if col >= len(names):
                    raise ValueError(
                        f"input file '{path}': input.columns.{name} is position {col} but the header has "
                        f"{len(names)} columns: {names}"
                    )
                positions[name] = col
            elif col not in names:
                raise ValueError(
                    f"input file '{path}': the header has no column '{col}' (input.columns.{name}); "
                    f"columns found: {names}. Fix input.columns.{name}, or set input.has_header=false if the "
                    "file has no header"
                )
            else:
                positions[name] = names.index(col)
        expected = len(names)
    else:
        expected = num_columns or len(first.split(delimiter))
        positions = dict(columns)
        for name, col in positions.items():
            assert isinstance(col, int)
            if col >= expected:
                raise ValueError(
                    f"input file '{path}': input.columns.{name} is position {col} but lines have {expected} "
                    f"fields (first line: {first[:200]!r}); set input.num_columns or fix the position"
                )
    return SourceFile(
        index=index,
        path=path,
        kind="text",
        fields=positions,
        delimiter=delimiter,
        has_header=has_header,
        num_columns=expected,
        strip_quotes=strip_quotes,
        compressed=path.endswith(".gz"),
        size=os.path.getsize(path),
    )


def _jsonl_source(index: int, path: str, columns: dict[str, int | str]) -> SourceFile:
    # A missing key in the first record is almost always a wrong mapping, not a bad row: say so now.
    with _open_binary(path) as f:
        for raw in f:
            if raw.strip():
                break
        else:
            raw = b""
    try:
        first = json.loads(raw)
    except ValueError:
        first = None
    if isinstance(first, dict):
        for name, col in columns.items():
            if col not in first:
                raise ValueError(
                    f"input file '{path}': the first record has no key '{col}' (input.columns.{name}); "
                    f"keys found: {sorted(first)}"
                )
    return SourceFile(
        index=index,
        path=path,
        kind="jsonl",
        fields=dict(columns),
        compressed=path.endswith(".gz"),
        size=os.path.getsize(path),
    )


def _parquet_source(index: int, path: str, columns: dict[str, int | str]) -> SourceFile:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"input file '{path}' is not a readable Parquet file: {exc}") from None
    for name, col in columns.items():
        if col not in schema.names:
            raise ValueError(
                f"input file '{path}': no column '{col}' (input.columns.{name}); columns found: {schema.names}"
            )
    return SourceFile(
        index=index, path=path, kind="parquet", fields=dict(columns), size=os.path.getsize(path)
    )


def resolve_sources(cfg: InputConfig) -> list[SourceFile]:
    """Expand ``cfg.paths`` and work out each file's layout; raises ``ValueError`` for a missing or
    empty file, a glob matching nothing, or a header without a mapped column."""
    paths = _expand(cfg.paths)
    sources: list[SourceFile] = []
    for index, path in enumerate(paths):
        if os.path.getsize(path) == 0:
            raise ValueError(f"input file '{path}' is empty (0 bytes)")
        fmt = cfg.format
        columns = cfg.columns.mapped()
        if fmt in ("csv", "tsv"):
            delimiter = cfg.delimiter or ("," if fmt == "csv" else "\t")
            sources.append(
                _text_source(index, path, delimiter, cfg.header_default(), columns, cfg.num_columns)
            )
        elif fmt == "movielens":
            delimiter, has_header, layout = _movielens_layout(path)
            sources.append(_text_source(index, path, delimiter, has_header, layout, None))
        elif fmt == "amazon":
            base = path.removesuffix(".gz")
            if base.endswith(".csv"):
                sources.append(_text_source(index, path, ",", False, dict(_AMAZON_CSV[2]), 4))
            elif base.endswith((".json", ".jsonl")):
                sources.append(_jsonl_source(index, path, dict(_AMAZON_JSON_FIELDS)))
            else:
                raise ValueError(
                    f"input file '{path}': input.format=amazon reads ratings .csv (user,item,rating,timestamp) "
                    "or review .json/.jsonl lines (reviewerID, asin, overall, unixReviewTime)"
                )
        elif fmt == "jsonl":
            sources.append(_jsonl_source(index, path, columns))
        elif fmt == "parquet":
            sources.append(_parquet_source(index, path, columns))
        elif fmt == "sequences":
            sources.append(
                SourceFile(
                    index=index,
                    path=path,
                    kind="sequences",
                    fields={"user": 0, "item": 1},
                    compressed=path.endswith(".gz"),
                    size=os.path.getsize(path),
                )
            )
        else:  # pragma: no cover - the config Literal rejects other values
            raise AssertionError(fmt)
    return [replace(s, location=os.path.abspath(s.path)) for s in sources]


def source_fields(sources: list[SourceFile]) -> set[str]:
    """The interaction fields the sources provide (the same for every file of a run)."""
    return set(sources[0].fields) if sources else set()


def plan_read_tasks(sources: list[SourceFile], chunk_bytes: int) -> list[ReadTask]:
    """Cut every file into read tasks of about ``chunk_bytes`` (compressed files: one task each)."""
    tasks: list[ReadTask] = []
    for src in sources:
        if src.kind == "parquet":
            meta = pq.ParquetFile(src.path).metadata
            start, acc = 0, 0
            for rg in range(meta.num_row_groups):
                acc += meta.row_group(rg).total_byte_size
                if acc >= chunk_bytes:
                    tasks.append(ReadTask(len(tasks), src.index, start, rg + 1))
                    start, acc = rg + 1, 0
            if start < meta.num_row_groups or meta.num_row_groups == 0:
                tasks.append(ReadTask(len(tasks), src.index, start, meta.num_row_groups))
        elif src.compressed:
            tasks.append(ReadTask(len(tasks), src.index, 0, -1))
        else:
            num_chunks = max(1, math.ceil(src.size / chunk_bytes))
            step = math.ceil(src.size / num_chunks)
            for k in range(num_chunks):
                tasks.append(ReadTask(len(tasks), src.index, k * step, min(src.size, (k + 1) * step)))
    return tasks


def _line_pieces(src: SourceFile, task: ReadTask, piece_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yield ``(buffer, offset)``: complete lines whose first byte lies in the task's range, at most
    about ``piece_bytes`` per buffer; ``offset`` is the buffer's position in the decompressed file."""
    for buf, offset in _raw_pieces(src, task, piece_bytes):
        if offset == 0 and buf.startswith(_BOM):
            # Spaces keep every offset in place; fields are trimmed anyway.
            buf = b"   " + buf[len(_BOM) :]
        yield buf, offset


_BOM = b"\xef\xbb\xbf"


def _raw_pieces(src: SourceFile, task: ReadTask, piece_bytes: int) -> Iterator[tuple[bytes, int]]:
    with _open_binary(src.location) as f:
        if src.compressed:
            offset = 0
            while True:
                buf = f.read(piece_bytes)
                if not buf:
                    return
                if not buf.endswith(b"\n"):
                    buf += f.readline()
                yield buf, offset
                offset += len(buf)
        pos = task.start
        if pos > 0:
            # The line that straddles `start` belongs to the previous task.
            f.seek(pos - 1)
            pos += len(f.readline()) - 1
        while pos < task.end:
            f.seek(pos)
            buf = f.read(min(piece_bytes, task.end - pos))
            if not buf.endswith(b"\n"):
                buf += f.readline()
            if not buf:
                return
            yield buf, pos
            pos += len(buf)


@dataclass
class Lines:
    """The lines of one buffer. ``text`` keeps each line's line break (trimming every line would copy
    the whole buffer; fields are trimmed anyway)."""

    text: pa.StringArray
    offsets: np.ndarray  # int64, file offset of each line start
    blank: np.ndarray  # bool: empty or whitespace only
    invalid_utf8: np.ndarray  # bool
    invalid_raw: list[str]  # the invalid lines, undecodable bytes replaced by U+FFFD


_WHITESPACE = np.array([9, 10, 11, 12, 13, 32], dtype=np.uint8)


def split_lines(buf: bytes, offset: int) -> Lines:
    """Split a buffer of complete lines into an Arrow string array without copying line by line."""
    assert len(buf) < 2**31, "pieces are bounded by read_chunk_bytes"
    data = np.frombuffer(buf, dtype=np.uint8)
    newlines = np.flatnonzero(data == 10)
    starts = np.concatenate([[0], newlines + 1]).astype(np.int64)
    if starts[-1] == len(buf):
        starts = starts[:-1]
    num_lines = len(starts)
    bounds = np.append(starts, len(buf))
    binary = pa.BinaryArray.from_buffers(
        pa.binary(), num_lines, [None, pa.py_buffer(bounds.astype(np.int32)), pa.py_buffer(buf)]
    )
    invalid = np.zeros(num_lines, dtype=bool)
    invalid_raw: list[str] = []
    try:
        text = binary.cast(pa.string())  # validates UTF-8
    except pa.ArrowInvalid:
        # Rare: find the offending lines one by one, blank them, and report them as rejects.
        values = binary.to_pylist()
        for i, value in enumerate(values):
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                invalid[i] = True
                invalid_raw.append(value.decode("utf-8", errors="replace"))
                values[i] = b"\n"
        text = pa.array(values, pa.binary()).cast(pa.string())
    # Blank lines: only those starting with whitespace need a closer look.
    blank = np.zeros(num_lines, dtype=bool)
    nonempty = bounds[1:] > starts
    maybe = np.flatnonzero(nonempty & np.isin(data[np.minimum(starts, len(buf) - 1)], _WHITESPACE))
    if len(maybe):
        trimmed = pc.utf8_trim_whitespace(text.take(pa.array(maybe)))
        blank[maybe] = np.asarray(pc.equal(pc.utf8_length(trimmed), 0))
    blank &= ~invalid
    return Lines(
        text=text, offsets=starts + offset, blank=blank, invalid_utf8=invalid, invalid_raw=invalid_raw
    )


def _filter(values: pa.Array, keep: np.ndarray) -> pa.Array:
    """``values.filter(keep)``, without the copy when everything is kept (the usual case)."""
    return values if keep.all() else values.filter(pa.array(keep))


@dataclass
class RawRecords:
    """What a read task extracted from one piece.

    ``fields`` holds one array per mapped interaction field (strings for text; any Arrow type for
    Parquet/JSON), aligned with ``pos`` and ``line``, for the records that were well formed; the raw
    text of interaction i is ``raw[raw_index[i]]`` (``raw_index`` None: ``raw[i]``), because a
    ``sequences`` line holds many interactions. ``rejects`` lists the records that were not well
    formed (``line``, ``reason``, ``raw``).
    """

    fields: dict[str, pa.Array]
    pos: np.ndarray
    line: np.ndarray
    raw: pa.Array | None  # raw text lines (None for Parquet: rendered on demand)
    rejects: dict[str, list]
    num_lines: int
    num_blank: int
    num_records: int
    raw_index: np.ndarray | None = None


def _empty_rejects() -> dict[str, list]:
    return {"line": [], "reason": [], "raw": []}


def _add_rejects(rejects: dict[str, list], lines: np.ndarray, reason: str, raw: pa.Array | list) -> None:
    raw_list = [r.rstrip("\r\n") for r in (raw.to_pylist() if isinstance(raw, pa.Array) else raw)]
    rejects["line"].extend(int(x) for x in lines)
    rejects["reason"].extend([reason] * len(raw_list))
    rejects["raw"].extend(raw_list)


def _clean_field(values: pa.Array, strip_quotes: bool) -> pa.Array:
    values = pc.utf8_trim_whitespace(values)
    # The regex is costly; most files quote nothing.
    if strip_quotes and pc.any(pc.starts_with(values, '"')).as_py():
        values = pc.replace_substring_regex(values, pattern=r'^"(.*)"$', replacement=r"\1")
    return values


def _split_fields_fast(
    src: SourceFile, buf: bytes, lines: Lines, keep: np.ndarray
) -> dict[str, pa.Array] | None:
    """The mapped fields of the kept lines, split by Arrow's CSV tokenizer (several times faster
    than splitting each line as a string), or None when the piece needs the general path.

    Quoting is off, so a field is exactly the bytes between delimiters, as in the general path. The
    tokenizer skips empty lines, ends lines at a bare CR too and fails on a wrong field count or
    invalid UTF-8: such pieces (a whitespace-only line, a bare CR, a malformed row) take the general
    path, which finds and reports them line by line.
    """
    if len(src.delimiter) != 1 or not keep.any() or lines.invalid_utf8.any():
        return None
    data = np.frombuffer(buf, dtype=np.uint8)
    cr = np.flatnonzero(data == 13)
    if len(cr) and (cr[-1] + 1 >= len(data) or (data[cr + 1] != 10).any()):
        return None  # a CR that does not end a line
    first = int(np.argmax(keep))  # the header line (if any) precedes the first kept line
    body = pa.py_buffer(buf).slice(int(lines.offsets[first] - lines.offsets[0]))
    names = [f"f{i}" for i in range(src.num_columns)]
    wanted = {name: f"f{col}" for name, col in src.fields.items()}
    try:
        table = pa_csv.read_csv(
            pa.BufferReader(body),
            read_options=pa_csv.ReadOptions(use_threads=False, column_names=names, block_size=len(buf) + 1),
            parse_options=pa_csv.ParseOptions(
                delimiter=src.delimiter, quote_char=False, escape_char=False, ignore_empty_lines=True
            ),
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() for c in names},
                include_columns=sorted(set(wanted.values())),
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        return None
    # Skipped lines are exactly the empty ones, so the rows are the kept lines in order; anything else
    # (e.g. a whitespace-only line that happened to tokenise) goes to the general path.
    if table.num_rows != int(keep[first:].sum()) or not keep[first:][~lines.blank[first:]].all():
        return None
    return {name: table.column(col).combine_chunks() for name, col in wanted.items()}


def _parse_text(
    src: SourceFile, lines: Lines, line_base: int, is_header: np.ndarray, buf: bytes | None = None
) -> RawRecords:
    rejects = _empty_rejects()
    local = np.arange(len(lines.offsets), dtype=np.int64) + line_base
    _add_rejects(rejects, local[lines.invalid_utf8], "invalid_utf8", lines.invalid_raw)
    keep = ~lines.blank & ~lines.invalid_utf8 & ~is_header
    fast = _split_fields_fast(src, buf, lines, keep) if buf is not None else None
    if fast is not None:
        kept = np.flatnonzero(keep)
        return RawRecords(
            fields={name: _clean_field(values, src.strip_quotes) for name, values in fast.items()},
            pos=lines.offsets[kept],
            line=local[kept],
            raw=lines.text,  # not filtered: only the few rejected lines are ever taken from it
            raw_index=kept,
            rejects=rejects,
            num_lines=len(lines.offsets),
            num_blank=int(lines.blank.sum()),
            num_records=int(len(lines.offsets) - lines.blank.sum() - is_header.sum()),
        )
    text = _filter(lines.text, keep)
    local, offsets = local[keep], lines.offsets[keep]
    parts = pc.split_pattern(text, pattern=src.delimiter)
    counts = np.asarray(pc.list_value_length(parts))
    good = counts == src.num_columns
    if not good.all():
        bad = pa.array(~good)
        _add_rejects(rejects, local[~good], "wrong_column_count", text.filter(bad))
        sel = pa.array(good)
        parts, text, local, offsets = parts.filter(sel), text.filter(sel), local[good], offsets[good]
    fields = {
        name: _clean_field(pc.list_element(parts, col), src.strip_quotes) for name, col in src.fields.items()
    }
    return RawRecords(
        fields=fields,
        pos=offsets,
        line=local,
        raw=text,
        rejects=rejects,
        num_lines=len(lines.offsets),
        num_blank=int(lines.blank.sum()),
        num_records=int(len(lines.offsets) - lines.blank.sum() - is_header.sum()),
    )


def _parse_sequences(lines: Lines, line_base: int) -> RawRecords:
    rejects = _empty_rejects()
    local = np.arange(len(lines.offsets), dtype=np.int64) + line_base
    _add_rejects(rejects, local[lines.invalid_utf8], "invalid_utf8", lines.invalid_raw)
    keep = ~lines.blank & ~lines.invalid_utf8
    text = _filter(lines.text, keep)
    local, offsets = local[keep], lines.offsets[keep]
    tokens = pc.split_pattern_regex(pc.utf8_trim_whitespace(text), pattern=r"\s+")
    counts = np.asarray(pc.list_value_length(tokens))
    good = counts >= 2
    if not good.all():
        _add_rejects(rejects, local[~good], "no_items", text.filter(pa.array(~good)))
        sel = pa.array(good)
        tokens, text, local, offsets, counts = (
            tokens.filter(sel),
            text.filter(sel),
            local[good],
            offsets[good],
            counts[good],
        )
    users = pc.list_element(tokens, 0)
    items = pc.list_flatten(pc.list_slice(tokens, 1))
    per_line = counts - 1
    parent = np.repeat(np.arange(len(per_line)), per_line)
    starts = np.concatenate([[0], np.cumsum(per_line)[:-1]]) if len(per_line) else np.zeros(0, np.int64)
    rank = np.arange(len(parent), dtype=np.int64) - np.repeat(starts, per_line)
    # A line has at least as many bytes as tokens, so offset + rank keeps file order across lines.
    return RawRecords(
        fields={"user": users.take(pa.array(parent)), "item": items},
        pos=offsets[parent] + rank,
        line=local[parent],
        raw=text,
        raw_index=parent,
        rejects=rejects,
        num_lines=len(lines.offsets),
        num_blank=int(lines.blank.sum()),
        num_records=int(keep.sum()),
    )


def _parse_jsonl(src: SourceFile, lines: Lines, buf: bytes, line_base: int) -> RawRecords:
    rejects = _empty_rejects()
    local = np.arange(len(lines.offsets), dtype=np.int64) + line_base
    _add_rejects(rejects, local[lines.invalid_utf8], "invalid_utf8", lines.invalid_raw)
    keep = ~lines.blank & ~lines.invalid_utf8
    text = _filter(lines.text, keep)
    local, offsets = local[keep], lines.offsets[keep]
    table = None
    if not lines.invalid_utf8.any():
        try:
            table = pa_json.read_json(
                io.BytesIO(buf), read_options=pa_json.ReadOptions(use_threads=False, block_size=len(buf) + 1)
            )
        except pa.ArrowInvalid:
            table = None
        # Two objects on one line, or a line that is not an object: fall back to line by line.
        if table is not None and table.num_rows != len(text):
            table = None
    if table is not None:
        fields = {
            name: (
                table.column(col).combine_chunks() if col in table.column_names else pa.nulls(table.num_rows)
            )
            for name, col in src.fields.items()
        }
        good = np.ones(len(text), dtype=bool)
    else:
        values: dict[str, list] = {name: [] for name in src.fields}
        good = np.zeros(len(text), dtype=bool)
        for i, line in enumerate(text.to_pylist()):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if not isinstance(record, dict):
                continue
            good[i] = True
            for name, col in src.fields.items():
                value = record.get(col)
                # Mixed types across lines (1 and "1") are the reason we are here: keep text.
                values[name].append(
                    None if value is None else value if isinstance(value, str) else json.dumps(value)
                )
        _add_rejects(rejects, local[~good], "bad_json", text.filter(pa.array(~good)))
        fields = {name: pa.array(v, pa.string()) for name, v in values.items()}
        text, local, offsets = text.filter(pa.array(good)), local[good], offsets[good]
    return RawRecords(
        fields=fields,
        pos=offsets,
        line=local,
        raw=text,
        rejects=rejects,
        num_lines=len(lines.offsets),
        num_blank=int(lines.blank.sum()),
        num_records=int(keep.sum()),
    )


def _read_parquet(src: SourceFile, task: ReadTask) -> Iterator[RawRecords]:
    pf = pq.ParquetFile(src.location)
    meta = pf.metadata
    names = sorted(set(src.fields.values()), key=str)
    row = sum(meta.row_group(rg).num_rows for rg in range(task.start))
    line = 0
    for rg in range(task.start, task.end):
        table = pf.read_row_group(rg, columns=names)
        n = table.num_rows
        yield RawRecords(
            fields={name: table.column(col).combine_chunks() for name, col in src.fields.items()},
            pos=np.arange(row, row + n, dtype=np.int64),
            line=np.arange(line, line + n, dtype=np.int64),
            raw=None,
            rejects=_empty_rejects(),
            num_lines=n,
            num_blank=0,
            num_records=n,
        )
        row += n
        line += n


def read_records(src: SourceFile, task: ReadTask, piece_bytes: int) -> Iterator[RawRecords]:
    """Parse one read task, piece by piece (memory bounded by ``piece_bytes``)."""
    if src.kind == "parquet":
        yield from _read_parquet(src, task)
        return
    line_base = 0
    for buf, offset in _line_pieces(src, task, piece_bytes):
        lines = split_lines(buf, offset)
        if src.kind == "sequences":
            records = _parse_sequences(lines, line_base)
        elif src.kind == "jsonl":
            records = _parse_jsonl(src, lines, buf, line_base)
        else:
            is_header = np.zeros(len(lines.offsets), dtype=bool)
            if src.has_header and offset == 0 and len(is_header):
                is_header[0] = True
            records = _parse_text(src, lines, line_base, is_header, buf)
        line_base += records.num_lines
        yield records
