"""The main job on the embedded default: synthetic log -> Ray prepare -> HSTU on 2 processes -> eval -> MLflow.

    bash cluster/dev.sh demo                 # from a fresh clone (creates .venv first)
    python -m train.demo [key=value ...]     # inside the venv; overrides go to the trainer config
    python -m train.demo --nproc 1           # one process

No download, no server: the log is generated (data/synthetic), prepared by the Ray job on an
embedded local Ray (data/prepared/synthetic), trained with configs/demo.yaml through torchrun, and
tracked in an embedded SQLite MLflow store (runs/mlflow.db). It ends by printing the test metrics
and the command that opens them in the MLflow UI.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from cluster.log import setup_logging

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    parser = argparse.ArgumentParser(prog="python -m train.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    parser.add_argument("overrides", nargs="*", help="trainer config overrides, key.sub=value")
    args = parser.parse_args(argv)
    os.chdir(ROOT)

    from cluster.config import load_config
    from data_pipeline.config import PrepareConfig
    from data_pipeline.prepare import prepare
    from data_pipeline.synthetic import GenerateConfig, generate

    t0 = time.perf_counter()
    log_path = Path("data/synthetic/interactions.csv")
    if log_path.is_file():
        logger.info("[1/3] synthetic log: reusing %s", log_path)
    else:
        logger.info("[1/3] generating the synthetic log")
        generate(GenerateConfig(output_dir="data/synthetic"))

    data_cfg = load_config(PrepareConfig, "configs/data/synthetic.yaml", ["output.overwrite=true"])
    if (Path(data_cfg.output.dir) / "manifest.json").is_file():
        logger.info("[2/3] prepared data: reusing %s (delete it to re-run the Ray job)", data_cfg.output.dir)
    else:
        logger.info("[2/3] preparing shards with Ray Data")
        prepare(data_cfg)

    logger.info("[3/3] training HSTU on %d process(es)", args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "train", "--config", "configs/demo.yaml", *args.overrides]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        logger.error("training failed (exit code %d); see the log above", proc.returncode)
        return proc.returncode

    from train.config import load_train_config

    train_cfg = load_train_config("configs/demo.yaml", args.overrides)
    out = Path(train_cfg.run.output_dir)
    final = json.loads((out / "final_metrics.json").read_text())
    test = final["test"]
    print(f"\nDemo finished in {time.perf_counter() - t0:.0f} s. Test metrics ({test.get('num_users')} users, "
          f"all items ranked, history excluded):")  # fmt: skip
    for key in ("hr@10", "ndcg@10", "hr@50", "mrr"):
        print(f"  {key:8s} {test[key]:.4f}")
    print(f"\nOutputs: {out}/ (final_metrics.json, test_predictions.parquet, metrics.jsonl, checkpoints/)")
    db = (out.resolve().parent / "mlflow.db") if train_cfg.tracking.tracking_uri is None else None
    uri = f"sqlite:///{db}" if db else train_cfg.tracking.tracking_uri
    print(
        f"Look at the run:  .venv/bin/mlflow ui --backend-store-uri {uri}   (then open http://127.0.0.1:5000)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
