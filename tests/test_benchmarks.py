"""Tests for the report helpers of benchmarks/ml1m_quality.py: reading a run's test curve from
metrics.jsonl (in the trainer's format) and finding when it first reached a target."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


# benchmarks/ is a folder of scripts, not a package: load the script as a module, once.
_spec = importlib.util.spec_from_file_location("ml1m_quality", ROOT / "benchmarks" / "ml1m_quality.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def write_metrics(run_dir: Path, records: list[dict]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_test_curve_carries_the_last_logged_epoch_to_each_test_point(tmp_path):
    write_metrics(tmp_path, [
        {"step": 20, "elapsed_s": 10.0, "train/epoch": 0.98, "train/loss": 5.0},
        {"step": 24, "elapsed_s": 12.0, "valid/hr@10": 0.11},  # no test key: not on the curve
        {"step": 24, "elapsed_s": 13.0, "test/hr@10": 0.10, "test/ndcg@10": 0.05},
        {"step": 44, "elapsed_s": 22.0, "train/epoch": 1.96, "train/loss": 4.0},
        {"step": 48, "elapsed_s": 25.0, "test/hr@10": 0.21, "test/ndcg@10": 0.12},
        {"step": 68, "elapsed_s": 35.0, "train/epoch": 2.94, "train/loss": 3.5},
        {"step": 72, "elapsed_s": 38.0, "test/hr@10": 0.19, "test/ndcg@10": 0.11},
    ])  # fmt: skip
    assert bench.test_curve(tmp_path, "hr@10") == [(1, 13.0, 0.10), (2, 25.0, 0.21), (3, 38.0, 0.19)]
    assert bench.test_curve(tmp_path, "ndcg@10") == [(1, 13.0, 0.05), (2, 25.0, 0.12), (3, 38.0, 0.11)]
    assert bench.test_curve(tmp_path, "mrr") == []
    assert bench.test_curve(tmp_path / "missing", "hr@10") == []


def test_time_to_gives_the_first_point_at_or_above_the_target():
    curve = [(1, 13.0, 0.10), (2, 25.0, 0.21), (3, 38.0, 0.19), (4, 50.0, 0.30)]
    assert bench.time_to(curve, 0.21) == (25.0, 2)  # "at" counts; the later dip and rise do not
    assert bench.time_to(curve, 0.25) == (50.0, 4)
    assert bench.time_to(curve, 0.31) == (None, None)
    assert bench.time_to([], 0.1) == (None, None)


def test_seed_summary_groups_runs_that_differ_only_by_seed():
    def row(seed, hr, gap="target", epochs=40):
        values = {k: hr for k in bench.KEYS}
        return {"model": "hstu", "source": f"runs/s{seed}", "input": "ratings.dat", "time_gap_from": gap,
                "epochs": epochs, "negatives": "full", "train_split": "train_valid", "seed": seed, **values}  # fmt: skip

    rows = [row(42, 0.30), row(7, 0.32), row(1, 0.34), row(42, 0.28, gap="input"), row(42, 0.5, epochs=60),
            {"model": "hstu", "source": "published", **bench.PUBLISHED["hstu"]}]  # fmt: skip
    (line,) = bench.seed_summary(rows)  # the input and 60-epoch runs have one seed each: no line
    assert line["seeds"] == [42, 7, 1] and line["time_gap_from"] == "target"
    assert abs(line["hr@10"] - 0.32) < 1e-12 and abs(line["hr@10_std"] - 0.02) < 1e-12
