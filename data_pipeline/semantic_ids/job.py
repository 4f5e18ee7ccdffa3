"""The ``semantic-ids`` job: item text -> embeddings -> RQ-VAE -> unique semantic IDs (TIGER).

    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml
    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml stages=[embed]
    python -m data_pipeline semantic-ids --config configs/data/yelp_semantic_ids.yaml stages=[train,assign] \
        rqvae.num_steps=2000 rqvae.gradient=rotation
    torchrun --standalone --nproc-per-node 2 -m data_pipeline semantic-ids \
        --config configs/data/beauty_semantic_ids.yaml stages=[train]      # DDP RQ-VAE training (gloo on CPU)

Stages (each reads the previous one's output from ``output_dir``; see config.py for the layout):
``embed`` (embed.py: a Ray Data job, embedded local Ray or ``ray.address=auto``), ``train``
(train_rqvae.py: single process, or DDP under torchrun), ``assign`` (assign.py: streamed encoding,
collision token, the semantic-ID table). Under torchrun only the train stage may run (Ray and the
single-process assignment do not belong in every rank).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cluster.config import ConfigError, load_config
from cluster.log import setup_logging
from data_pipeline.semantic_ids.config import STAGES, SemanticIdConfig

logger = logging.getLogger(__name__)


def run(cfg: SemanticIdConfig) -> dict:
    """Run the configured stages in order; returns ``{stage: its manifest or metrics}``."""
    results = {}
    stages = [s for s in STAGES if s in cfg.stages]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and stages != ["train"]:
        raise ConfigError(
            "stages",
            f"under torchrun only stages=[train] runs (got {cfg.stages}); run the others in one process",
        )
    for stage in stages:
        if stage == "embed":
            from data_pipeline.semantic_ids.embed import embed_items

            results[stage] = embed_items(cfg)
        elif stage == "train":
            from data_pipeline.semantic_ids.train_rqvae import train_rqvae

            results[stage] = train_rqvae(cfg)
        else:
            from data_pipeline.semantic_ids.assign import assign_ids

            results[stage] = assign_ids(cfg)
    return results


def main(argv: list[str] | None = None) -> int:
    """``python -m data_pipeline semantic-ids --config FILE [key=value ...]``."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline semantic-ids", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--config", help="YAML file with SemanticIdConfig keys (see configs/data/*_semantic_ids.yaml)"
    )
    parser.add_argument(
        "overrides", nargs="*", help="key.sub=value overrides, e.g. stages=[embed] rqvae.num_steps=100"
    )
    args = parser.parse_args(argv)
    setup_logging()
    import ray.data  # noqa: F401  (configures its loggers on import; quiet them after)

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        cfg = load_config(SemanticIdConfig, args.config, args.overrides)
        results = run(cfg)
    except (ConfigError, ValueError) as exc:
        logger.error("%s", exc)
        return 2 if isinstance(exc, ConfigError) else 1
    if "assign" in results:
        m = results["assign"]
        print(f"semantic ids -> {cfg.output_dir}/semantic_ids (collision rate before the extra token "
              f"{m['assign/collision_rate']:.4f})", file=sys.stderr)  # fmt: skip
    return 0
