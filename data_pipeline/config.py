"""Configuration of the ``prepare`` job (raw interaction logs -> sharded Parquet sequences).

Loaded with ``cluster.config.load_config(PrepareConfig, "configs/data/ml100k.yaml", ["key=value"])``.
Relative paths (``input.paths``, ``input.item_metadata``, ``output.dir``) resolve against the
current working directory of the process that runs the job, so run it from the project root.
docs/data_pipeline.md explains every key; docs/data_format.md describes the output.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from cluster.config import ConfigError

INPUT_FORMATS = ("csv", "tsv", "parquet", "jsonl", "movielens", "amazon", "sequences")


@dataclass
class ColumnsConfig:
    """Where each field of an interaction is found: a column name, or a 0-based position for text
    files without a header. ``None`` means the source has no such field."""

    user: int | str | None = "user"
    item: int | str | None = "item"
    timestamp: int | str | None = "timestamp"
    rating: int | str | None = None
    event: int | str | None = None

    def mapped(self) -> dict[str, int | str]:
        """The fields that are mapped to a column, in a fixed order."""
        fields = {
            "user": self.user,
            "item": self.item,
            "timestamp": self.timestamp,
            "rating": self.rating,
            "event": self.event,
        }
        return {name: col for name, col in fields.items() if col is not None}


@dataclass
class InputConfig:
    """What to read. ``movielens``, ``amazon`` and ``sequences`` fix the column layout themselves
    (``columns``, ``has_header`` and ``delimiter`` are then ignored)."""

    format: Literal["csv", "tsv", "parquet", "jsonl", "movielens", "amazon", "sequences"] = "csv"
    # Files or glob patterns, read in the order given (globs expand sorted). Plain or ``.gz``.
    paths: list[str] = field(default_factory=list)
    # None: csv/tsv have a header, other formats do not.
    has_header: bool | None = None
    # None: "," for csv, tab for tsv. May be several characters (e.g. "::").
    delimiter: str | None = None
    # Expected number of fields per line for header-less csv/tsv; None = taken from the first line.
    num_columns: int | None = None
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # "unix" (seconds, integer or decimal), "unix_ms" (milliseconds), or a strptime pattern such as
    # "%Y-%m-%d %H:%M:%S" (read as UTC).
    timestamp_format: str = "unix"
    # Optional item side information (json mapping, jsonl records, csv, or a MovieLens u.item /
    # movies.dat / movies.csv): title, brand, categories, description -> items/metadata.parquet.
    item_metadata: str | None = None
    # Field of a record that holds the raw item id; None = first of item, item_id, asin, id, movieId.
    item_metadata_id_field: str | None = None
    # Added to integer keys of the metadata before matching raw item ids (Yelp items.json is keyed by
    # item id minus 1, so it needs 1).
    item_metadata_key_offset: int = 0
    # For metadata that maps items to attribute ids (S3-Rec Amazon ``item_attributes.json``: item id ->
    # [attribute id, ...]): a JSON file with ``id2attribute`` (``datamaps.json``) that names them. The
    # names become the item's categories (the file does not say which attribute is the brand).
    item_metadata_attribute_names: str | None = None

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        if not self.paths:
            raise ConfigError("input.paths", "is empty; give at least one file or glob pattern")
        if self.format in ("csv", "tsv", "parquet", "jsonl"):
            for name in ("user", "item"):
                if getattr(self.columns, name) is None:
                    raise ConfigError(f"input.columns.{name}", f"is required for input.format={self.format}")
            has_header = self.header_default()
            for name, col in self.columns.mapped().items():
                if isinstance(col, int) and col < 0:
                    raise ConfigError(f"input.columns.{name}", f"got {col}, expected a 0-based position >= 0")
                if self.format in ("csv", "tsv") and not has_header and isinstance(col, str):
                    raise ConfigError(
                        f"input.columns.{name}",
                        f"is the name {col!r} but input.has_header is false; give a 0-based column position",
                    )
                if self.format in ("parquet", "jsonl") and isinstance(col, int):
                    raise ConfigError(
                        f"input.columns.{name}", f"is a position ({col}); {self.format} columns are named"
                    )
        if self.delimiter is not None and (self.delimiter == "" or "\n" in self.delimiter):
            raise ConfigError("input.delimiter", f"got {self.delimiter!r}, expected a non-empty separator")
        if self.item_metadata_attribute_names is not None and self.item_metadata is None:
            raise ConfigError(
                "input.item_metadata_attribute_names",
                "only applies with input.item_metadata (the attribute ids)",
            )
        if self.num_columns is not None and self.num_columns < 1:
            raise ConfigError("input.num_columns", f"got {self.num_columns}, expected >= 1")
        if self.timestamp_format not in ("unix", "unix_ms") and "%" not in self.timestamp_format:
            raise ConfigError(
                "input.timestamp_format",
                f"got {self.timestamp_format!r}, expected 'unix', 'unix_ms' or a strptime pattern like '%Y-%m-%d'",
            )

    def header_default(self) -> bool:
        """Whether text files start with a header line."""
        if self.has_header is not None:
            return self.has_header
        return self.format in ("csv", "tsv")


@dataclass
class FiltersConfig:
    """Which interactions and users to keep. Every removal is counted in the manifest."""

    min_rating: float | None = None
    # Keep only these event types (needs input.columns.event); None keeps all.
    events: list[str] | None = None
    # Repeated (user, item) pairs: keep all, the chronologically first, or the last.
    dedup: Literal["none", "keep_first", "keep_last"] = "none"
    # What makes two interactions duplicates: the same user and item, or also the same timestamp.
    dedup_key: Literal["user_item", "user_item_timestamp"] = "user_item"
    # Iterative k-core: every kept user has >= user_core and every kept item >= item_core interactions.
    user_core: int = 0
    item_core: int = 0
    # Users with fewer interactions are dropped (part of the same fixed point as the k-core).
    min_seq_len: int = 3

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        for key in ("user_core", "item_core", "min_seq_len"):
            if getattr(self, key) < 0:
                raise ConfigError(f"filters.{key}", f"got {getattr(self, key)}, expected >= 0")


@dataclass
class SplitConfig:
    """How user sequences become train / valid / test rows (see docs/data_format.md)."""

    method: Literal["leave_one_out", "temporal"] = "leave_one_out"
    # temporal: interactions before this unix time are history; the first one at or after it is the
    # test target.
    temporal_cutoff: int | None = None
    # temporal, optional: same for the valid split (must be < temporal_cutoff). Without it the valid
    # target is the last interaction before temporal_cutoff.
    valid_cutoff: int | None = None
    # Also write the split "older": the part of each user's history that max_seq_len cuts from the
    # train row, as windows of up to max_seq_len + 1 items (several rows per user), so training can
    # use every interaction (trainer: data.older_windows=true). Valid and test targets never enter it.
    older_windows: bool = False
    # Cold start: this fraction of the items (chosen by a hash of the raw item id and cold_items_seed,
    # so the same items in every process and run) is held out of training entirely. Their
    # interactions are removed from every row, except when one is a user's test target: those test
    # users measure how well a model reaches items it never saw (through their text or semantic IDs).
    # Users left with fewer than 3 interactions get no rows. The manifest lists the cold items
    # (vocab/cold_items.parquet); evaluation reports them as test_cold/*. Leave-one-out only.
    cold_items_fraction: float = 0.0
    cold_items_seed: int = 0

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        if not 0.0 <= self.cold_items_fraction < 1.0:
            raise ConfigError(
                "split.cold_items_fraction",
                f"got {self.cold_items_fraction}, expected a fraction in [0, 1) (0 turns cold start off)",
            )
        if self.cold_items_fraction > 0 and self.method != "leave_one_out":
            raise ConfigError("split.cold_items_fraction", "only applies to split.method=leave_one_out")
        if self.method == "temporal" and self.temporal_cutoff is None:
            raise ConfigError("split.temporal_cutoff", "is required when split.method is 'temporal'")
        if self.valid_cutoff is not None:
            if self.method != "temporal":
                raise ConfigError("split.valid_cutoff", "only applies to split.method=temporal")
            assert self.temporal_cutoff is not None
            if self.valid_cutoff >= self.temporal_cutoff:
                raise ConfigError(
                    "split.valid_cutoff",
                    f"got {self.valid_cutoff}, expected < split.temporal_cutoff ({self.temporal_cutoff})",
                )


@dataclass
class OutputConfig:
    """Where and how the prepared data is written."""

    dir: str = ""
    # A complete earlier output (with manifest.json) is only replaced when this is true. An incomplete
    # one (a killed run) is always removed.
    overwrite: bool = False
    # At most this many rows (users) per Parquet file; file k of a split holds the users with dense
    # ids in (k * rows_per_file, (k + 1) * rows_per_file].
    rows_per_file: int = 65536
    row_group_size: int = 1024

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        if not self.dir:
            raise ConfigError("output.dir", "is required (the directory to write the prepared data to)")
        for key in ("rows_per_file", "row_group_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"output.{key}", f"got {getattr(self, key)}, expected >= 1")


@dataclass
class RayConfig:
    """Where the job runs and how it cuts the work."""

    # None: start an embedded local Ray (shut down afterwards); "auto" or "host:port": join a cluster
    # (then output.dir must be on a file system that every node sees).
    address: str | None = None
    # CPUs of the embedded local Ray; None = all.
    num_cpus: int | None = None
    # Users are hash-partitioned into this many buckets; None = from the input size (ray.bucket_bytes).
    num_buckets: int | None = None
    # Input bytes per bucket when num_buckets is None: bounds the memory of one bucket task.
    bucket_bytes: int = 64 * 2**20
    # Input bytes per read task.
    read_chunk_bytes: int = 32 * 2**20

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError("ray.num_cpus", f"got {self.num_cpus}, expected >= 1")
        if self.num_buckets is not None and not 1 <= self.num_buckets <= 65536:
            raise ConfigError("ray.num_buckets", f"got {self.num_buckets}, expected 1..65536")
        for key in ("bucket_bytes", "read_chunk_bytes"):
            if getattr(self, key) < 1024:
                raise ConfigError(f"ray.{key}", f"got {getattr(self, key)}, expected >= 1024")


@dataclass
class PrepareConfig:
    """The whole ``prepare`` job."""

    input: InputConfig = field(default_factory=InputConfig)
    filters: FiltersConfig = field(default_factory=FiltersConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    # Rows hold at most max_seq_len + 1 items (the most recent).
    max_seq_len: int = 200
    # The job fails when more than this fraction of the input records is rejected.
    max_reject_fraction: float = 0.01
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        # Sections left at their defaults were not validated while loading; validating twice is harmless.
        for section in (self.input, self.filters, self.split, self.output, self.ray):
            section.validate()
        if self.max_seq_len < 1:
            raise ConfigError("max_seq_len", f"got {self.max_seq_len}, expected >= 1")
        if not 0.0 <= self.max_reject_fraction <= 1.0:
            raise ConfigError("max_reject_fraction", f"got {self.max_reject_fraction}, expected 0..1")
        min_needed = 3 if self.split.method == "leave_one_out" else 2
        if self.filters.min_seq_len < min_needed:
            raise ConfigError(
                "filters.min_seq_len",
                f"got {self.filters.min_seq_len}; split.method={self.split.method} needs at least "
                f"{min_needed} interactions per user",
            )
        if self.split.method == "temporal" and (
            self.input.format == "sequences" or self.input.columns.timestamp is None
        ):
            raise ConfigError(
                "split.method", "'temporal' needs timestamps; this input has none (use leave_one_out)"
            )
        if self.filters.events is not None and (
            self.input.format in ("movielens", "amazon", "sequences") or self.input.columns.event is None
        ):
            raise ConfigError(
                "filters.events", "needs an event column (input.columns.event with csv/tsv/parquet/jsonl)"
            )
        if self.filters.min_rating is not None and self.input.format == "sequences":
            raise ConfigError("filters.min_rating", "sequences input has no ratings")
