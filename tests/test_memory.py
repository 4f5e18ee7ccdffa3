"""The memory model (cluster/memory.py): each term against hand-computed cases, and the activation
and loss terms against a real step measured with PyTorch's MemTracker."""

from __future__ import annotations

import pytest

from cluster.memory import (
    ACTIVATION_MODELS,
    BatchShape,
    GiB,
    ModelDims,
    dense_bytes,
    embedding_bytes,
    estimate_memory,
    hstu_activations,
    loss_bytes,
    model_dims,
    parse_bytes,
    pending_rows_grad_bytes,
    stored_width,
)
from train.config import load_train_config


def test_stored_width_rounds_to_fbgemm_alignment():
    assert [stored_width(d) for d in (50, 52, 1, 128)] == [52, 52, 4, 128]


@pytest.mark.parametrize(
    "sharding, world, local, rows_cols",
    [
        ("row_wise", 4, 4, (251, 52)),  # ceil(1001 / 4) rows, 50 stored as 52
        ("table_wise", 4, 4, (1001, 52)),  # one rank holds the table
        ("table_row_wise", 8, 4, (251, 52)),  # rows split over one host's 4 ranks
        ("data_parallel", 4, 4, (1001, 52)),
    ],
)
def test_embedding_weights_and_optimizer_by_sharding(sharding, world, local, rows_cols):
    rows, cols = rows_cols
    out = {
        opt: embedding_bytes(1001, 50, sharding, opt, world, local)
        for opt in ("rowwise_adagrad", "adagrad", "sgd", "adam")
    }
    assert out["sgd"]["embedding_weights"] == rows * cols * 4
    assert out["sgd"]["embedding_optimizer"] == 0
    assert out["rowwise_adagrad"]["embedding_optimizer"] == rows * 4
    assert out["adagrad"]["embedding_optimizer"] == rows * cols * 4
    assert out["adam"]["embedding_optimizer"] == 2 * rows * cols * 4
    expected_grads = rows * cols * 4 if sharding == "data_parallel" else 0
    assert out["sgd"]["embedding_grads"] == expected_grads


def test_column_wise_rowwise_adagrad_keeps_one_row_of_state_per_column_shard():
    # 256 columns in TorchRec's default 128-wide blocks: 2 shards.
    one_rank = embedding_bytes(1001, 256, "column_wise", "rowwise_adagrad", 1, 1)
    assert one_rank["embedding_weights"] == 1001 * 256 * 4
    assert one_rank["embedding_optimizer"] == 2 * 1001 * 4
    four_ranks = embedding_bytes(1001, 256, "column_wise", "rowwise_adagrad", 4, 4)
    assert four_ranks["embedding_weights"] == 1001 * 128 * 4
    assert four_ranks["embedding_optimizer"] == 1001 * 4


def test_dense_bytes_by_zero_stage():
    p, n = 1000, 4

    def terms(*args, **kw):
        return dense_bytes(*args, reduce_bucket_elements=50, **kw)

    assert terms(p, 0, n, "fp32") == {"dense_params": 4000, "dense_grads": 4000, "dense_optimizer": 8000,
                                      "dense_buffers": 0}  # fmt: skip
    assert terms(p, 0, n, "bf16") == {"dense_params": 2000, "dense_grads": 2000, "dense_optimizer": 12000,
                                      "dense_buffers": 0}  # fmt: skip
    # stage 1: optimizer states + fp32 master partitioned (12 x 1000 / 4); an fp32 bucket of 50
    assert terms(p, 1, n, "bf16") == {"dense_params": 2000, "dense_grads": 2000, "dense_optimizer": 3000,
                                      "dense_buffers": 200}  # fmt: skip
    # stage 2: bf16 grads and the fp32 gradient partition split over ranks; two bf16 buckets
    assert terms(p, 2, n, "bf16") == {"dense_params": 2000, "dense_grads": 1500, "dense_optimizer": 3000,
                                      "dense_buffers": 200}  # fmt: skip
    # buckets never exceed the model at stages 1-2
    assert dense_bytes(p, 2, n, "fp32", reduce_bucket_elements=10**9)["dense_buffers"] == 2 * 4 * p
    # stage 3: params too, plus the gathered working set of two layers (2 x 100 params x 2 bytes);
    # the bucket and the flat fp32 gradient partition (4 x 1000 / 4)
    stage3 = terms(p, 3, n, "bf16", largest_layer_params=100)
    assert stage3["dense_params"] == 500 + 400 and stage3["dense_buffers"] == 100 + 1000
    offloaded = terms(p, 3, n, "bf16", True, True, largest_layer_params=100)
    assert offloaded == {"dense_params": 400, "dense_grads": 500, "dense_optimizer": 0, "dense_buffers": 100}
    with pytest.raises(ValueError, match="offload_params needs zero_stage=3"):
        dense_bytes(p, 2, n, "bf16", offload_params=True)


def test_hstu_activations_hand_computed():
    # One layer, D = E = F = 4, one head, one row of 3 tokens, fp32, no dropout.
    dims = ModelDims("hstu", 4, 1, 1, 4, 4, 8)
    batch = BatchShape.from_lengths([3], "hstu")
    assert (batch.num_tokens, batch.padded_tokens, batch.padded_squares, batch.group_squares) == (3, 3, 9, 9)
    out = hstu_activations(dims, batch, 4, checkpointing=False)
    per_token = 4 * (2 * 4 + 4 * 4 + 7 * 4)  # 208 bytes
    layer = 3 * per_token + 4 * 3 * (2 * 4 + 4)  # + padded Q, K, V
    shared = 12 * 9 + 8 * 3 + 2 * 4 * 3 * 4
    backward = 4 * 3 * (2 * 4 + 2 * 4)
    assert out == {"activations": layer + shared + backward, "attention": 9 * 2 * 4 + 4 * 9 // 2}


def test_checkpointing_shrinks_with_depth():
    dims = ModelDims("hstu", 64, 8, 2, 32, 32, 200)
    batch = BatchShape.bound(4096, 200, "hstu")
    full = hstu_activations(dims, batch, 2, checkpointing=False)
    ckpt = hstu_activations(dims, batch, 2, checkpointing=True)
    assert ckpt["activations"] < full["activations"] / 3
    assert ckpt["attention"] < full["attention"] / 4


def test_loss_bytes_hand_computed():
    batch = BatchShape(2, 10, 50, 5, 10, 50)
    assert loss_bytes(batch, 8, "shared", 5, 100) == 13 * 10 * 5
    assert loss_bytes(batch, 8, "in_batch", 5, 100) == 13 * 10 * 10
    assert loss_bytes(batch, 8, "full", 5, 100) == 12 * 10 * 100
    assert loss_bytes(batch, 8, "per_position", 5, 100) == 8 * 10 * 5 + 12 * 10 * 5 * 8


@pytest.mark.parametrize("name", ["hstu", "sasrec"])
def test_num_params_matches_the_real_module(name):
    from train.models import build_encoder
    from train.models.config import ModelConfig

    shared = dict(embedding_dim=48, num_blocks=3, num_heads=2)
    if name == "hstu":
        cfg = ModelConfig(name=name, attention_dim=16, linear_dim=40, **shared)
    else:  # SASRec: d_qk is the model width; ffn_dim is the feed-forward width
        cfg = ModelConfig(name=name, ffn_dim=40, **shared)
    dims = ModelDims(name, 48, 3, 2, 16, 40, cfg.max_seq_len, use_time_bias=True, num_time_buckets=128)
    assert dims.num_params() == sum(p.numel() for p in build_encoder(cfg).parameters())


@pytest.mark.parametrize("num_layers", [1, 3])
def test_gru4rec_num_params_matches_the_real_module(num_layers):
    from train.models import build_encoder
    from train.models.config import ModelConfig

    cfg = ModelConfig(name="gru4rec", embedding_dim=48, hidden_size=40, num_layers=num_layers)
    dims = ModelDims("gru4rec", 48, num_layers, 1, 0, 40, cfg.max_seq_len)
    assert dims.num_params() == sum(p.numel() for p in build_encoder(cfg).parameters())


def test_bert4rec_num_params_matches_the_real_module():
    from train.models.bert4rec import Bert4Rec
    from train.models.config import ModelConfig

    cfg = ModelConfig(name="bert4rec", embedding_dim=48, num_blocks=3, num_heads=2, ffn_dim=40)
    dims = ModelDims("bert4rec", 48, 3, 2, 0, 40, cfg.max_seq_len)
    assert dims.num_params() == sum(p.numel() for p in Bert4Rec(cfg).parameters())


@pytest.mark.parametrize("config", ["configs/gru4rec_ml1m.yaml", "configs/bert4rec_ml1m.yaml"])
def test_gru4rec_and_bert4rec_memory_models_from_their_configs(config):
    """The task registry hands out their memory models; BERT4Rec offers activation checkpointing
    (its blocks are wrapped) and it shrinks the activations of a long batch, GRU4Rec does not."""
    from cluster.memory import family_memory

    cfg = load_train_config(config)
    family = family_memory(cfg)
    assert family.num_params() == model_dims(cfg).num_params() > 0
    batch = family.batch_bound(4096)
    est = estimate_memory(cfg, world_size=8, local_world_size=8, num_items=3706, batch=batch, family=family)
    assert est.terms["activations"] > 0 and est.terms["loss"] > 0
    if cfg.model.name == "gru4rec":
        assert not family.supports_checkpointing
        with pytest.raises(ValueError, match="checkpointing is not available"):
            estimate_memory(
                cfg, world_size=8, local_world_size=8, num_items=3706, batch=batch, checkpointing=True
            )
        return
    assert family.supports_checkpointing
    ckpt = estimate_memory(cfg, world_size=8, local_world_size=8, num_items=3706, batch=batch,
                           checkpointing=True, family=family)  # fmt: skip
    # 2 blocks of rows of 200: one block's input instead of everything the blocks save.
    assert ckpt.terms["activations"] < est.terms["activations"] / 2
    assert ckpt.terms["attention"] == 0 and "recompute" in ckpt.terms and "backward" not in ckpt.terms
    assert family.table_shape(3706) == (3708, 64)  # padding, items, the mask row
    # The loss is over the masked positions: p T + one per row + 4 binomial standard deviations.
    assert 0.2 * 4096 < family.masked_bound(batch) < 0.25 * 4096


def test_model_dims_reads_the_config():
    cfg = load_train_config("configs/hstu_large_ml1m.yaml")
    dims = model_dims(cfg)
    assert (dims.name, dims.embedding_dim, dims.num_blocks) == (
        "hstu",
        cfg.model.embedding_dim,
        cfg.model.num_blocks,
    )
    assert set(ACTIVATION_MODELS) >= {"hstu", "sasrec"}


def test_estimate_memory_has_every_term():
    cfg = load_train_config("configs/hstu_ml1m.yaml", ["embeddings.sharding_type=row_wise", "zero.stage=2"])
    est = estimate_memory(cfg, world_size=8, local_world_size=8, num_items=3706,
                          batch=BatchShape.bound(4096, 200, "hstu"))  # fmt: skip
    expected = {"embedding_weights", "embedding_optimizer", "embedding_grads", "lookup", "dense_params",
                "dense_grads", "dense_optimizer", "dense_buffers", "activations", "attention", "loss"}  # fmt: skip
    assert set(est.terms) == expected
    assert est.with_margin > est.total > 0


def test_parse_bytes():
    assert parse_bytes("80GiB") == 80 * GiB
    assert parse_bytes("40GB") == 40 * 10**9
    assert parse_bytes("512MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="expected e.g. 80GiB"):
        parse_bytes("lots")


@pytest.mark.parametrize(
    "name, lengths, negatives, loss_every",
    [
        ("hstu", [200] * 12 + [40] * 30, "shared", 1),  # attention-heavy
        ("hstu", [12] * 200, "full", 1),  # linear-heavy, full softmax
        ("sasrec", [60] * 40, "in_batch", 1),
        ("gru4rec", [60] * 20 + [15] * 20, "shared", 1),  # padding-heavy: the peak is in backward
        ("gru4rec", [50] * 30, "full", 1),  # the peak is at the loss
        ("bert4rec", [60] * 20 + [15] * 20, "full", 5),  # a loss at every 5th position (the masks)
        ("bert4rec", [100] * 20, "shared", 5),
    ],
)
def test_activation_and_loss_terms_match_memtracker(name, lengths, negatives, loss_every):
    """Predicted activations + attention + loss within 10% of MemTracker's measured peak activations
    (GRU4Rec, BERT4Rec: + the larger of the loss and backward's extra, which comes after it)."""
    import dataclasses

    from cluster.memory_measure import measure_dense_step

    dims = ModelDims(name, 32, 2, 2, 16, 16, 256)
    positions = list(range(0, sum(lengths), loss_every))
    measured = measure_dense_step(dims, lengths, negatives=negatives, num_negatives=64, num_items=500,
                                  loss_positions=None if loss_every == 1 else positions)  # fmt: skip
    batch = BatchShape.from_lengths(lengths, name)
    act = ACTIVATION_MODELS[name](dims, batch, 4, False)
    targets = dataclasses.replace(batch, num_tokens=len(positions))
    loss = loss_bytes(targets, 32, negatives, 64, 500)
    predicted = act["activations"] + act["attention"] + max(loss, act.get("backward", 0))
    assert abs(predicted - measured.activations) / measured.activations < 0.10, (predicted, measured)
    # The persistent dense state: fp32 params and AdamW's two moments (+ step counters).
    dense = dense_bytes(dims.num_params(), 0, 1, "fp32")
    assert abs(measured.params - dense["dense_params"]) / dense["dense_params"] < 0.05
    assert abs(measured.optimizer - dense["dense_optimizer"]) / dense["dense_optimizer"] < 0.05


@pytest.mark.parametrize(
    "name, heads, linear_dim, dropout, lengths, num_negatives",
    [
        ("hstu", 2, 32, 0.0, [200] * 16, 256),  # the peak is at a recomputed layer's attention weights
        ("hstu", 4, 32, 0.0, [20] * 160, 256),  # ... at its U * norm (linear-heavy)
        ("hstu", 2, 32, 0.0, [60] * 20, 4096),  # ... at the end of the forward pass (loss buffers)
        ("sasrec", 1, 64, 0.0, [100] * 40, 16),  # ... at a recomputed block's FFN
        # BERT4Rec, the loss at every 5th position (its masks). Without attention dropout CPU SDPA
        # takes the fused (flash) kernel, as CUDA does: the peak is at a recomputed block's end...
        ("bert4rec", 2, 64, 0.0, [200] * 16, 16),
        ("bert4rec", 2, 256, 0.0, [200] * 16, 16),  # ... at its GELU's backward (ffn_dim 4D)
        ("bert4rec", 2, 64, 0.0, [60] * 100, 4096),  # ... at the end of the forward pass (loss)
        # With attention dropout CPU takes the math kernel: the peak is in the attention's backward.
        ("bert4rec", 4, 64, 0.1, [256] * 8, 16),
    ],
)
def test_checkpointed_terms_match_memtracker(name, heads, linear_dim, dropout, lengths, num_negatives):
    """With activation checkpointing the peak is the end of the forward pass or a recomputed layer,
    whichever holds more; predicted within 5% of MemTracker's measured peak activations. BERT4Rec's
    loss, its pending target rows and the query the harness keeps are over its masked positions."""
    import dataclasses

    from cluster.memory_measure import measure_dense_step

    attention_dim = 32 if name == "hstu" else 64
    dims = ModelDims(
        name, 64, 4, heads, attention_dim, linear_dim, 256, dropout=dropout, attn_dropout=dropout
    )
    num_tokens = sum(lengths)
    positions = list(range(0, num_tokens, 5)) if name == "bert4rec" else list(range(num_tokens))
    measured = measure_dense_step(dims, lengths, num_negatives=num_negatives, num_items=2000, checkpointing=True,
                                  loss_positions=positions if name == "bert4rec" else None)  # fmt: skip
    batch = BatchShape.from_lengths(lengths, name)
    # CPU SDPA: the fused kernel unless there is attention dropout (as RetrievalMemory.step_terms).
    kwargs = {"flash": dropout == 0} if name in ("sasrec", "bert4rec") else {}
    act = ACTIVATION_MODELS[name](dims, batch, 4, True, **kwargs)
    targets = dataclasses.replace(batch, num_tokens=len(positions))
    loss = loss_bytes(targets, 64, "shared", num_negatives, 2000)
    pending = pending_rows_grad_bytes(targets, 64, "shared", num_negatives, 2000)
    harness_query = 4 * len(positions) * 64  # the harness keeps its query alive through backward
    predicted = act["activations"] + max(loss, act["recompute"] + pending + harness_query)
    assert abs(predicted - measured.activations) / measured.activations < 0.05, (predicted, measured)
    without = ACTIVATION_MODELS[name](dims, batch, 4, False, **kwargs)
    assert measured.activations < without["activations"] + without["attention"] + loss
