"""GPU tier: the same trainer on CUDA (nccl); skipped, with the reason, without a CUDA device."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import TINY_MODEL, run_train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_cuda_run_matches_the_cpu_run(synthetic_data, tmp_path):
    import torch

    nproc = min(2, torch.cuda.device_count())
    common = [f"data.dir={synthetic_data}", *TINY_MODEL, "data.partition=strided", "run.epochs=1",
              "zero.precision=fp32", "embeddings.optimizer=adagrad"]  # fmt: skip
    gpu = run_train(common, tmp_path / "gpu", nproc=nproc)
    assert "backend nccl" in gpu.stderr
    run_train(common, tmp_path / "cpu", nproc=nproc, env={"CUDA_VISIBLE_DEVICES": ""})

    def losses(out):
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return [r["train/loss"] for r in records if "train/loss" in r]

    np.testing.assert_allclose(losses(tmp_path / "gpu"), losses(tmp_path / "cpu"), rtol=1e-3)
