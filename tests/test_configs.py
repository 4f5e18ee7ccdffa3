"""Every shipped config loads and validates, and says in its header how to run it."""

from __future__ import annotations

import pytest

from cluster.config import ConfigError, load_config
from data_pipeline.config import PrepareConfig
from tests.conftest import ROOT
from train.config import LossConfig, load_train_config

TRAIN_CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
SEMANTIC_ID_CONFIGS = sorted((ROOT / "configs" / "data").glob("*_semantic_ids.yaml"))
DATA_CONFIGS = sorted(set((ROOT / "configs" / "data").glob("*.yaml")) - set(SEMANTIC_ID_CONFIGS))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_trainer_configs_load_and_document_their_command(path):
    cfg = load_train_config(str(path))
    cfg.model.validate()
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert any("-m train" in line for line in header), f"{path.name}: the header gives no launch command"


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=lambda p: p.name)
def test_data_configs_load(path):
    load_config(PrepareConfig, path)


@pytest.mark.parametrize("path", SEMANTIC_ID_CONFIGS, ids=lambda p: p.name)
def test_semantic_id_configs_load_and_document_their_command(path):
    from data_pipeline.semantic_ids.config import SemanticIdConfig

    load_config(SemanticIdConfig, path)
    assert "-m data_pipeline semantic-ids" in path.read_text(), f"{path.name}: the header gives no command"


def test_there_are_configs():
    assert len(TRAIN_CONFIGS) >= 4 and len(DATA_CONFIGS) >= 4


def test_loss_describe_names_the_negatives_a_number_used():
    assert LossConfig(negatives="per_position", num_negatives=128).describe() == "per_position(128)"
    assert LossConfig(negatives="shared", num_negatives=2048).describe() == "shared(2048)"
    assert LossConfig(negatives="full", num_negatives=512).describe() == "full"
    assert LossConfig(negatives="in_batch").describe() == "in_batch"


@pytest.mark.parametrize(
    "override",
    ["optim.decay_fraction=0", "optim.decay_fraction=1.5", "optim.min_lr_ratio=2", "optim.warmup_steps=-1"],
)
def test_bad_schedule_names_its_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=key):
        load_train_config(None, [override])


def test_base_merges_key_by_key_and_overrides_apply_last(tmp_path):
    (tmp_path / "parent.yaml").write_text("model:\n  num_blocks: 2\n  dropout: 0.2\noptim:\n  lr: 0.001\n")
    sub = tmp_path / "variants"
    sub.mkdir()
    (sub / "child.yaml").write_text("base: ../parent.yaml\nmodel:\n  num_blocks: 8\n")
    cfg = load_train_config(str(sub / "child.yaml"), ["optim.lr=0.003"])
    assert cfg.model.num_blocks == 8  # the child's value
    assert cfg.model.dropout == 0.2  # the sibling key kept from the parent
    assert cfg.optim.lr == 0.003  # the override beats both files


def test_shipped_variant_states_only_its_changes():
    large = load_train_config(str(ROOT / "configs/hstu_large_ml1m.yaml"))
    fast = load_train_config(str(ROOT / "configs/hstu_large_ml1m_1h.yaml"))
    assert (fast.model, fast.loss, fast.data.batch_size) == (large.model, large.loss, large.data.batch_size)
    assert (fast.optim.lr, fast.optim.decay_fraction, fast.run.epochs) == (0.002, 0.3, 25)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: missing.yaml\n", "does not exist"),
        ("base: loop.yaml\n", "loops"),
        ("base: [a]\n", "expected the path"),
    ],
)
def test_bad_base_names_the_file_and_the_problem(tmp_path, text, message):
    (tmp_path / "loop.yaml").write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_train_config(str(tmp_path / "loop.yaml"))
    assert "loop.yaml" in str(err.value) and "base" in str(err.value)


def test_base_loop_through_two_files_shows_the_chain(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="loops") as err:
        load_train_config(str(tmp_path / "a.yaml"))
    assert "a.yaml -> " in str(err.value) and "b.yaml -> " in str(err.value)


def test_override_that_is_not_yaml_names_its_key():
    with pytest.raises(ConfigError, match="optim.lr.*not valid YAML.*quote it"):
        load_train_config(None, ["optim.lr={oops: [1"])
