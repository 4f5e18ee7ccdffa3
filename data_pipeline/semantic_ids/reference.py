"""``python -m data_pipeline semantic-ids-reference``: store a published semantic-ID file in our format.

    python -m data_pipeline semantic-ids-reference \\
        --input ../shared/data/amazon-beauty/reference_semantic_ids.json \\
        --output data/semantic_ids/beauty_reference [--prepared data/prepared/amazon_beauty]
"""

from __future__ import annotations

import argparse
import logging

from data_pipeline.semantic_ids.table import convert_reference

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, convert, print a one-line summary; exit code 1 on bad input."""
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline semantic-ids-reference",
        description="Convert a reference semantic-ID JSON ({item id - 1: ['<a_N>', ...]}) to semantic_ids/v1.",
    )
    parser.add_argument("--input", required=True, help="reference_semantic_ids.json")
    parser.add_argument(
        "--output", required=True, help="directory to write semantic_ids.parquet + manifest.json"
    )
    parser.add_argument(
        "--prepared", help="prepared data dir: check that every item in vocab/items.parquet has codes"
    )
    args = parser.parse_args(argv)
    try:
        table = convert_reference(args.input, args.output, prepared_dir=args.prepared)
    except ValueError as exc:
        logger.error("%s", exc)
        return 1
    m = table.manifest
    print(
        f"{args.output}: {table.num_items} items, {table.num_levels} levels, codebook sizes {table.codebook_sizes}, "
        f"{m['reference_num_unique_tuples']} unique reference tuples, collision rate {m['collision_rate']:.4f}"
    )
    return 0
