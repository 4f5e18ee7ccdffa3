"""Train HSTU or SASRec on prepared shards: TorchRec sharded item table + DeepSpeed ZeRO dense model.

Launch commands (configs in configs/, any key overridable as key.sub=value):

    # one process (CPU or one GPU)
    python -m train --config configs/hstu_ml1m.yaml

    # one node, N processes (gloo on CPU, nccl on GPUs: chosen automatically)
    torchrun --nproc-per-node 2 -m train --config configs/hstu_ml1m.yaml zero.stage=2

    # several nodes, one torchrun per node (sbatch files that do this come with slurm/, next wave)
    torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint $HEAD:29500 \
        -m train --config configs/hstu_large_ml1m.yaml

Outputs go to run.output_dir: config.yaml, deepspeed_config.json, sharding_plan.txt, checkpoints/,
final_metrics.json, test_predictions.parquet; metrics and artifacts also go to MLflow
(sqlite:///<output_dir>/../mlflow.db unless tracking.tracking_uri or MLFLOW_TRACKING_URI is set).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from cluster.config import ConfigError
from cluster.log import setup_logging

logger = logging.getLogger("train")


def parse_args(argv: list[str] | None) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(prog="python -m train", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML file in configs/")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    return args.config, args.overrides


def main(argv: list[str] | None = None) -> dict:
    """Load config, build, resume, train, close; always tear down the process group."""
    setup_logging()
    config_path, overrides = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from train.config import load_train_config

    cfg = load_train_config(config_path, overrides)
    from train.distributed import destroy_distributed, init_distributed
    from train.trainer import Trainer

    info = init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, info)
        trainer.maybe_resume()
        result = trainer.train()
        trainer.close("FINISHED")
        return result
    except BaseException:
        if trainer is not None:
            trainer.close("FAILED")
        raise
    finally:
        trainer = None  # it holds the process group; see destroy_distributed
        destroy_distributed()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        # User errors: one clear line, no traceback from deep inside a library.
        logging.getLogger("train").error("%s", exc)
        sys.exit(2)
