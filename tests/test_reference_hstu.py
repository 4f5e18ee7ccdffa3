"""Tests for benchmarks/reference_hstu.py: the CPU patch applies to Meta's reference checkout (each of
the five changes lands, the patched files compile), a checkout that does not match is refused by name,
and the step-time parsing drops exactly the warm-up, epoch-boundary and in-loop-eval steps."""

from __future__ import annotations

import importlib.util
import os
import py_compile
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A bare clone of facebookresearch/generative-recommenders; GR_REFERENCE_GIT_DIR points elsewhere.
REFERENCE_GIT = Path(
    os.environ.get(
        "GR_REFERENCE_GIT_DIR", ROOT.parent / ".mirror/facebookresearch+generative-recommenders/repo"
    )
)

# benchmarks/ is a folder of scripts, not a package: load the script as a module, once.
_spec = importlib.util.spec_from_file_location("reference_hstu", ROOT / "benchmarks" / "reference_hstu.py")
ref = importlib.util.module_from_spec(_spec)
sys.modules["reference_hstu"] = ref  # dataclasses resolve the module by name
_spec.loader.exec_module(ref)


@pytest.fixture
def reference_checkout(tmp_path) -> Path:
    """The reference's files at HEAD of the bare clone, exported to a temporary folder (skip if absent)."""
    if not (REFERENCE_GIT / "HEAD").is_file():
        pytest.skip(f"{REFERENCE_GIT} is absent (a clone of facebookresearch/generative-recommenders)")
    archive = tmp_path / "ref.tar"
    subprocess.run(["git", f"--git-dir={REFERENCE_GIT}", "archive", "-o", str(archive), "HEAD"], check=True)
    out = tmp_path / "checkout"
    out.mkdir()
    with tarfile.open(archive) as tar:
        tar.extractall(out, filter="data")
    return out


def test_cpu_patch_applies_to_the_reference_checkout(reference_checkout, tmp_path):
    copy = ref.copy_and_patch(reference_checkout, tmp_path / "copy")
    edits = [*ref.CPU_EDITS, *ref.TIMING_EDITS]
    assert len(ref.CPU_EDITS) == 5
    for edit in edits:
        patched = (copy / edit.path).read_text()
        original = (reference_checkout / edit.path).read_text()
        assert edit.new in patched and edit.new not in original, edit.name
    for edit in ref.CPU_EDITS:  # these replace the GPU-only line
        assert edit.old not in (copy / edit.path).read_text(), edit.name
    for path in {e.path for e in edits}:
        py_compile.compile(str(copy / path), doraise=True)
    assert (reference_checkout / "main.py").read_text().count("max(1, torch.cuda.device_count())") == 0
    with pytest.raises(ValueError, match="change '1 main.py"):  # a second time: the copy no longer matches
        ref.apply_edits(copy, ref.CPU_EDITS)


def test_patch_refuses_a_checkout_that_does_not_match(tmp_path):
    for edit in ref.CPU_EDITS:  # every original line present once ...
        path = tmp_path / edit.path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text((path.read_text() if path.exists() else "") + edit.old)
    train = tmp_path / ref.TRAIN_PY  # ... but the DDP line changed upstream
    train.write_text(train.read_text().replace("device_ids=[rank]", "device_ids=[local_rank]"))
    with pytest.raises(ValueError, match=r"train.py: change '5 train.py: DDP.*found it 0 times.*2e81fab"):
        ref.apply_edits(tmp_path, ref.CPU_EDITS)


def test_reference_steps_drop_warmup_epoch_boundary_and_eval():
    lines = [
        "INFO:root:Training model on rank 0.\n",
        "INFO:root:refbench step 0 epoch 0 tokens 100 eval 1 t 10.0\n",
        "INFO:root:refbench step 1 epoch 0 tokens 110 eval 0 t 12.0\n",
        "INFO:root:refbench step 2 epoch 0 tokens 120 eval 0 t 13.0\n",
        "INFO:root:refbench step 3 epoch 0 tokens 130 eval 0 t 15.0\n",
        "INFO:root:refbench step 4 epoch 1 tokens 140 eval 0 t 60.0\n",  # DataLoader restart + epoch eval
        "INFO:root:refbench step 5 epoch 1 tokens 150 eval 1 t 70.0\n",  # in-loop eval
        "INFO:root:refbench step 6 epoch 1 tokens 160 eval 0 t 74.0\n",
    ]
    steps = ref.reference_steps(lines, warmup=2)
    assert [(s.step, s.seconds, s.excluded) for s in steps] == [
        (1, 2.0, "warm-up"), (2, 1.0, ""), (3, 2.0, ""), (4, 45.0, "epoch boundary"),
        (5, 10.0, "in-loop eval"), (6, 4.0, ""),
    ]  # fmt: skip
    summary = ref.summarize(steps)
    assert summary["measured_steps"] == 3
    assert summary["s_per_step"] == 2.0  # median of 1, 2, 4
    assert summary["tokens_per_s"] == 65.0  # median of 120/1, 130/2, 160/4
    assert summary["tokens_per_step"] == 130


def test_our_steps_drop_warmup_and_the_step_after_an_epoch_boundary():
    # 3 steps an epoch: train/epoch reads 1/3, 2/3, 1.0 in epoch 0, then 1 + 1/3 for the first of epoch 1.
    records = [
        {"step": k, "elapsed_s": t, "train/epoch": e, "train/tokens_per_s": 100.0}
        for k, t, e in [(1, 5.0, 1 / 3), (2, 6.0, 2 / 3), (3, 7.0, 1.0), (4, 20.0, 4 / 3), (5, 21.5, 5 / 3)]
    ] + [{"step": 5, "elapsed_s": 22.0, "test/hr@10": 0.1}]  # not a train record
    steps = ref.our_steps(records, warmup=1, seen_at={k: 100.0 + k for k in range(1, 6)})
    assert [(s.step, s.epoch, s.seconds, s.excluded) for s in steps] == [
        (2, 0, 1.0, ""), (3, 0, 1.0, ""), (4, 1, 13.0, "epoch boundary"), (5, 1, 1.5, ""),
    ]  # fmt: skip
    assert [s.tokens for s in steps] == [100.0, 100.0, 1300.0, 150.0]
    assert [s.end_t for s in steps] == [102.0, 103.0, 104.0, 105.0]
