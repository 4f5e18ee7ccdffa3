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

    def test_curve(run_dir, key):  # (epoch, elapsed seconds, value) of test/<key>, as the report uses it
        return [point[1:] for point in bench.curve_points(bench.read_records(run_dir), "test", key)]

    assert test_curve(tmp_path, "hr@10") == [(1, 13.0, 0.10), (2, 25.0, 0.21), (3, 38.0, 0.19)]
    assert test_curve(tmp_path, "ndcg@10") == [(1, 13.0, 0.05), (2, 25.0, 0.12), (3, 38.0, 0.11)]
    assert test_curve(tmp_path, "mrr") == []
    assert test_curve(tmp_path / "missing", "hr@10") == []


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


# ------------------------------------------------------------------- the report on synthetic runs


def write_run(run_dir: Path, overrides: list[str], final: dict, records: list[dict]) -> Path:
    """A finished run directory as the trainer leaves it: config.yaml, final_metrics.json, metrics.jsonl."""
    from cluster.config import save_config
    from train.config import load_train_config

    save_config(load_train_config(None, overrides), run_dir / "config.yaml")
    (run_dir / "final_metrics.json").write_text(json.dumps(final))
    write_metrics(run_dir, records)
    return run_dir


BEAUTY_TEST = {"hr@5": 0.031, "hr@10": 0.052, "ndcg@5": 0.020, "ndcg@10": 0.027, "mrr": 0.02}


def beauty_run(tmp_path: Path) -> Path:
    """A Beauty-protocol run (train split: valid curve, best checkpoint at step 20 = epoch 2)."""
    records = [
        {"step": 5, "elapsed_s": 30.0, "train/epoch": 0.5, "train/loss": 9.0, "train/tokens_per_s": 100.0},
        {"step": 10, "elapsed_s": 60.0, "train/epoch": 1.0, "train/loss": 8.0, "train/tokens_per_s": 400.0},
        {"step": 10, "elapsed_s": 70.0, "valid/hr@10": 0.030},
        {"step": 15, "elapsed_s": 100.0, "train/epoch": 1.5, "train/loss": 7.0, "train/tokens_per_s": 600.0},
        {"step": 20, "elapsed_s": 130.0, "train/epoch": 2.0, "train/loss": 6.5, "train/tokens_per_s": 500.0},
        {"step": 20, "elapsed_s": 140.0, "valid/hr@10": 0.061},
        {"step": 30, "elapsed_s": 200.0, "train/epoch": 3.0, "train/loss": 6.4, "train/tokens_per_s": 800.0},
        {"step": 30, "elapsed_s": 210.0, "valid/hr@10": 0.055},
    ]  # fmt: skip
    params = {"dense": 1000, "tables": 64 * 12102, "total": 1000 + 64 * 12102}
    final = {"test": BEAUTY_TEST, "valid": {}, "best_step": 20, "steps": 30, "epochs": 3, "elapsed_s": 240.0,
             "params": params, "train_split": "train"}  # fmt: skip
    overrides = [
        "model.name=sasrec",
        "loss.function=binary",
        "loss.negatives=per_position",
        "loss.num_negatives=1",
    ]
    return write_run(tmp_path / "sasrec_beauty", overrides, final, records)


def test_beauty_rows_carry_time_speed_size_loss_and_the_selected_epoch(tmp_path, capsys):
    beauty = bench.DATASETS["beauty"]
    run = beauty_run(tmp_path)
    unfinished = tmp_path / "hstu_unfinished"
    write_metrics(unfinished, [{"step": 10, "elapsed_s": 60.0, "train/epoch": 1.0, "valid/hr@10": 0.01}])
    rows = bench.build_rows([("sasrec", run), ("hstu", unfinished), ("tiger", tmp_path / "absent")], beauty)
    assert "not finished" in capsys.readouterr().out
    ours, published, tiger = rows  # no row for the unfinished run, HSTU has no published Beauty row
    assert published == {"model": "sasrec", "source": "published", "hr@5": 0.0387, "hr@10": 0.0605,
                         "ndcg@5": 0.0249, "ndcg@10": 0.0318}  # fmt: skip
    assert tiger["source"] == "published" and tiger["hr@10"] == 0.0648
    assert {k: ours[k] for k in beauty.keys} == {k: BEAUTY_TEST[k] for k in beauty.keys}
    assert ours["negatives"] == "binary per_position(1)" and ours["loss_function"] == "binary"
    assert ours["train_split"] == "train" and ours["curve_split"] == "valid"
    assert ours["epochs"] == 3 and ours["best_epoch"] == 2  # the checkpoint selected at step 20
    assert ours["best_curve_hr@10"] == 0.061 and ours["best_curve_epoch"] == 2
    assert ours["tokens_per_s"] == 550.0  # median of 400, 600, 500, 800: the first window (warm-up) dropped
    assert ours["elapsed_s"] == 240.0 and ours["params"]["total"] == 1000 + 64 * 12102
    # A valid curve is never compared with the published (test) HR@10, though it passes it.
    assert ours["published_hr@10_reached_s"] is None
    table = bench.format_table(rows, beauty)
    header = table.splitlines()[1].split()
    assert header[2:6] == ["hr@5", "hr@10", "ndcg@5", "ndcg@10"] and "hr@200" not in table
    line = next(line for line in table.splitlines() if "sasrec_beauty" in line)
    assert "loss=binary per_position(1)" in line and "tokens/s=550" in line and "time=4min" in line
    assert "params=0.776M" in line and "best_epoch=2" in line


def test_ml1m_test_curve_rows_note_when_the_published_hr10_was_reached(tmp_path):
    records = [
        {"step": 10, "elapsed_s": 60.0, "train/epoch": 1.0, "train/loss": 8.0, "train/tokens_per_s": 10.0},
        {"step": 10, "elapsed_s": 65.0, "test/hr@10": 0.20},
        {"step": 20, "elapsed_s": 120.0, "train/epoch": 2.0, "train/loss": 7.0, "train/tokens_per_s": 20.0},
        {"step": 20, "elapsed_s": 125.0, "test/hr@10": 0.2860},
        {"step": 30, "elapsed_s": 180.0, "train/epoch": 3.0, "train/loss": 6.0, "train/tokens_per_s": 30.0},
        {"step": 30, "elapsed_s": 185.0, "test/hr@10": 0.3100},
    ]  # fmt: skip
    final = {"test": {k: 0.3 for k in bench.KEYS}, "best_step": -1, "epochs": 3, "elapsed_s": 200.0,
             "train_split": "train_valid"}  # an older run: no "params"  # fmt: skip
    run = write_run(
        tmp_path / "sasrec_tv", ["model.name=sasrec", "data.train_split=train_valid"], final, records
    )
    (ours, published) = bench.build_rows([("sasrec", run)], bench.DATASETS["ml1m"])
    assert published["source"] == "published" and published["hr@10"] == bench.PUBLISHED["sasrec"]["hr@10"]
    assert ours["curve_split"] == "test" and ours["best_epoch"] is None and ours["params"] is None
    assert (ours["published_hr@10_reached_s"], ours["published_hr@10_reached_epoch"]) == (125.0, 2)  # 0.2853
    assert ours["hstu_hr@10_reached_s"] == 185.0 and ours["hstu_large_hr@10_reached_s"] is None
    assert ours["tokens_per_s"] == 25.0 and ours["negatives"] == "shared(512)"
    assert "params=" not in bench.format_table([ours, published], bench.DATASETS["ml1m"])


def test_curves_against_wall_time_use_each_runs_own_split(tmp_path):
    beauty = bench.DATASETS["beauty"]
    valid_run = beauty_run(tmp_path)
    curves = bench.curves_by_run([("sasrec", valid_run), ("tiger", tmp_path / "absent")], "hr@10")
    (curve,) = curves
    assert curve["split"] == "valid" and "(valid)" in curve["label"]
    assert curve["points"] == [(1, 70.0 / 60, 0.030), (2, 140.0 / 60, 0.061), (3, 210.0 / 60, 0.055)]
    path = bench.plot_curves(curves, "hr@10", tmp_path / "plot.png", beauty)
    assert path.is_file() and path.stat().st_size > 1000
    assert bench.plot_curves([], "hr@10", tmp_path / "none.png", beauty) is None


def run_report(argv: list[str], monkeypatch) -> dict:
    """``main()`` of the report with ``argv``; the JSON it wrote (under a temporary results folder)."""
    monkeypatch.setattr(bench.sys, "argv", ["ml1m_quality.py", *argv])
    assert bench.main() == 0
    return json.loads((bench.ROOT / "benchmarks" / "results" / "beauty_quality.json").read_text())


def test_an_archived_report_brings_back_rows_and_curves_of_runs_that_are_gone(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(bench, "ROOT", tmp_path / "root")  # the report writes under ROOT/benchmarks/results
    bench.ROOT.mkdir()
    monkeypatch.chdir(bench.ROOT)  # main() changes into ROOT; the test's working directory comes back after
    run = beauty_run(tmp_path)
    first = run_report(
        ["--dataset", "beauty", "--report-only", "--models", "--run", f"sasrec={run}"], monkeypatch
    )
    (ours, published) = first["rows"]
    assert ours["source"] == str(run) and published["source"] == "published"
    (curve,) = first["curves"]
    assert curve["source"] == str(run) and curve["points"] == [[1, 70.0 / 60, 0.030], [2, 140.0 / 60, 0.061],
                                                               [3, 210.0 / 60, 0.055]]  # fmt: skip
    archive = tmp_path / "archive.json"
    shutil.copy(bench.ROOT / "benchmarks" / "results" / "beauty_quality.json", archive)
    shutil.rmtree(run)  # the machine was wiped

    again = run_report(
        ["--dataset", "beauty", "--report-only", "--models", "--archive", str(archive)], monkeypatch
    )
    assert again["rows"] == first["rows"] and again["curves"] == first["curves"]
    assert (bench.ROOT / "benchmarks" / "results" / "beauty_quality.png").stat().st_size > 1000

    # A live run of the same directory replaces its archived row and curve rather than doubling them.
    run = beauty_run(tmp_path)
    live = run_report(["--dataset", "beauty", "--report-only", "--models", "--run", f"sasrec={run}", "--archive",
                       str(archive)], monkeypatch)  # fmt: skip
    assert live["rows"] == first["rows"] and live["curves"] == first["curves"]


def test_an_archive_of_another_data_set_or_format_is_refused_in_one_line(tmp_path, monkeypatch):
    import pytest

    beauty = bench.DATASETS["beauty"]
    wrong_model = tmp_path / "ml1m.json"
    wrong_model.write_text(json.dumps({"rows": [{"model": "hstu_large", "source": "runs/x"}], "curves": []}))
    with pytest.raises(SystemExit, match="hstu_large.*not a model of --dataset beauty"):
        bench.read_archive(wrong_model, beauty, set())
    old_format = tmp_path / "old.json"
    old_format.write_text(
        json.dumps([{"model": "sasrec", "source": "runs/x"}])
    )  # a list: the old report's JSON
    with pytest.raises(SystemExit, match="expected a JSON written by this script with 'rows' and 'curves'"):
        bench.read_archive(old_format, beauty, set())


def test_seed_summary_takes_the_datasets_keys():
    def row(seed, hr):
        return {"model": "sasrec", "source": f"runs/s{seed}", "input": "?", "time_gap_from": None,
                "epochs": 10, "negatives": "full", "train_split": "train", "seed": seed, "hr@5": hr / 2, "hr@10": hr,
                "ndcg@5": hr / 4, "ndcg@10": hr / 3}  # fmt: skip

    (line,) = bench.seed_summary([row(1, 0.05), row(2, 0.07)], bench.DATASETS["beauty"].keys)
    assert abs(line["hr@10"] - 0.06) < 1e-12 and abs(line["hr@5"] - 0.03) < 1e-12
    assert "mrr" not in line and "hr@200" not in line
