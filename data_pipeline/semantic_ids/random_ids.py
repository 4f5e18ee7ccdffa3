"""``python -m data_pipeline semantic-ids-random``: random codes for every item, the control tokenizer.

    python -m data_pipeline semantic-ids-random --prepared data/prepared/amazon_beauty \\
        --output data/semantic_ids/beauty_random [--levels 3] [--codebook-size 256] [--seed 0]

Same table format and collision token as the learned IDs (``semantic_ids/v1``), so a model trained on
them differs from one trained on semantic IDs only in what the codes mean: the comparison that tells
whether the text, rather than code sharing as such, helps.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pyarrow.parquet as pq

from data_pipeline.semantic_ids.table import random_semantic_ids, write_semantic_ids

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Draw the codes for the prepared vocabulary's items, write them, print a one-line summary."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline semantic-ids-random",
        description="Random unique semantic IDs (num levels + a collision token) for a prepared vocabulary.",
    )
    parser.add_argument("--prepared", required=True, help="prepared data dir (its vocab/items.parquet)")
    parser.add_argument(
        "--output", required=True, help="directory to write semantic_ids.parquet + manifest.json"
    )
    parser.add_argument("--levels", type=int, default=3, help="random levels before the collision token")
    parser.add_argument("--codebook-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    vocab = Path(args.prepared) / "vocab" / "items.parquet"
    if not vocab.is_file():
        logger.error("%s not found; pass a prepared data dir (python -m data_pipeline prepare)", vocab)
        return 1
    item_ids = pq.read_table(vocab, columns=["raw_id"])["raw_id"].to_pylist()
    try:
        table = random_semantic_ids(item_ids, args.levels, args.codebook_size, args.seed)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    write_semantic_ids(args.output, table)
    print(
        f"{args.output}: {table.num_items} items, {table.num_levels} levels, codebook sizes "
        f"{table.codebook_sizes}, collision rate {table.manifest['collision_rate']:.4f}"
    )
    return 0
