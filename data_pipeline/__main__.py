"""Data pipeline command line.

    python -m data_pipeline prepare  --config configs/data/ml100k.yaml [key=value ...]
    python -m data_pipeline generate [num_users=... output_dir=... key=value ...]
    python -m data_pipeline download ml-100k --dest data/raw
    python -m data_pipeline semantic-ids --config configs/data/beauty_semantic_ids.yaml [stages=[embed] ...]
    python -m data_pipeline semantic-ids-reference --input REF.json --output DIR [--prepared DIR]
    python -m data_pipeline semantic-ids-random --prepared DIR --output DIR [--seed N]

``prepare`` runs on an embedded local Ray by default; ``ray.address=auto`` (or an address) joins a
running cluster. See docs/data_format.md for what it writes.
"""

from __future__ import annotations

import sys

from cluster.log import setup_logging

COMMANDS = {
    "prepare": "data_pipeline.prepare",
    "generate": "data_pipeline.synthetic",
    "download": "data_pipeline.download",
    "semantic-ids": "data_pipeline.semantic_ids.job",
    "semantic-ids-reference": "data_pipeline.semantic_ids.reference",
    "semantic-ids-random": "data_pipeline.semantic_ids.random_ids",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(__doc__, file=sys.stderr)
        print(f"commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    setup_logging()
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
