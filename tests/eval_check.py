"""Recompute the trainer's valid HR@10 / NDCG@10 / MRR the slow, obvious way; run by tests/test_eval.py.

    python -m tests.eval_check --config FILE key=value ...   # one process; prints a JSON line

Builds a ``Trainer`` from the config, trains it (``run.epochs``), then scores every valid row one
user at a time through the *training* path: raw rows of the sharded table through ``lookup`` into
the DeepSpeed engine's module, cosine against every item, history excluded, rank counted with ties
against the target; the items excluded follow ``eval.exclude`` (read independently from the split
files, not through train.evaluation.UserHistory). Prints ``{"trainer": Trainer.evaluate("valid"), "brute_force": ...}``.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from train.__main__ import parse_args
from train.config import load_train_config
from train.distributed import destroy_distributed, init_distributed
from train.embeddings import lookup
from train.reader import load_manifest
from train.trainer import Trainer


@torch.no_grad()
def brute_force_valid(trainer: Trainer) -> dict:
    cfg, device = trainer.cfg, trainer.device
    module = trainer.engine.module.eval()
    raw = lookup(trainer.task.table, torch.arange(trainer.num_items + 1), device).float()
    unit = F.normalize(raw, dim=-1)
    manifest = load_manifest(cfg.data.dir)
    # eval.exclude=all_history: every item of the user's train and older rows, plus the valid row's.
    seen: dict[int, set[int]] = {}
    for split in ("train", "older") if cfg.eval.exclude == "all_history" else ():
        for entry in manifest["splits"].get(split, {}).get("files", []):
            table = pq.read_table(f"{cfg.data.dir}/{entry['path']}", columns=["user_id", "item_ids"])
            for user, items in zip(table["user_id"].to_pylist(), table["item_ids"].to_pylist()):
                seen.setdefault(user, set()).update(items)
    hits, ndcg, rr = [], [], []
    for entry in manifest["splits"]["valid"]["files"]:
        table = pq.read_table(
            f"{cfg.data.dir}/{entry['path']}", columns=["user_id", "item_ids", "timestamps"]
        )
        rows = zip(
            table["user_id"].to_pylist(), table["item_ids"].to_pylist(), table["timestamps"].to_pylist()
        )
        for user, items, stamps in rows:
            whole_row = items
            items = items[-(cfg.model.max_seq_len + 1) :]
            if len(items) < 2:
                continue
            inputs, target = items[:-1], items[-1]
            ts = target_ts = None
            if stamps is not None:  # each input's time, and the time of the item after it
                stamps = stamps[-len(items) :]
                ts = torch.tensor(stamps[:-1], device=device)
                target_ts = torch.tensor(stamps[1:], device=device)
            query = module(
                raw[torch.tensor(inputs, device=device)],
                torch.tensor([0, len(inputs)], device=device),
                len(inputs),
                ts,
                target_ts,
            )[-1]
            scores = (unit @ query).cpu().numpy().astype(np.float64)
            if cfg.eval.exclude == "all_history":
                excluded = (set(whole_row[:-1]) | seen.get(user, set())) - {target}
            else:
                excluded = set(inputs) - {target}
            eligible = [i for i in range(1, trainer.num_items + 1) if i not in excluded and i != target]
            rank = int(sum(scores[i] >= scores[target] for i in eligible))  # ties count against
            hits.append(rank < 10)
            ndcg.append(1.0 / math.log2(rank + 2) if rank < 10 else 0.0)
            rr.append(1.0 / (rank + 1))
    return {"hr@10": float(np.mean(hits)), "ndcg@10": float(np.mean(ndcg)), "mrr": float(np.mean(rr)),
            "num_users": len(hits)}  # fmt: skip


def main() -> None:
    config_path, overrides = parse_args(sys.argv[1:])
    cfg = load_train_config(config_path, overrides)
    info = init_distributed()
    trainer = None
    try:
        trainer = Trainer(cfg, info)
        trainer.train()
        result = {"trainer": trainer.evaluate("valid"), "brute_force": brute_force_valid(trainer)}
        trainer.close()
        print(json.dumps(result))
    finally:
        trainer = None  # it holds the process group; see destroy_distributed
        destroy_distributed()


if __name__ == "__main__":
    main()
