"""HSTU encoder: time buckets, jagged vs padded reference vs a brute-force loop, causality, gradients."""

from __future__ import annotations

import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from cluster.config import ConfigError, load_config
from train.models import HSTU, SASRec, build_encoder, time_buckets
from train.models.config import DEFAULT_TIME_BUCKET_BASE, ModelConfig
from train.models.hstu import _GatherBias, plan_length_groups


def make_batch(lengths: list[int], dim: int, seed: int = 0):
    """Random jagged batch: item embeddings [T, dim], offsets [B + 1], increasing timestamps [T] and
    target timestamps [T] (each a random gap after the input's own time)."""
    gen = torch.Generator().manual_seed(seed)
    lengths_B = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_B.cumsum(0)])
    num_tokens = int(offsets[-1])
    item_emb = torch.randn(num_tokens, dim, generator=gen)
    # Gaps from seconds to months, so that many time buckets are used.
    gaps = torch.exp(torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 16).to(torch.int64)
    timestamps = 1_600_000_000 + gaps.cumsum(0)
    next_gaps = torch.exp(torch.rand(num_tokens, generator=gen, dtype=torch.float64) * 16).to(torch.int64)
    return item_emb, offsets, max(lengths), timestamps, timestamps + next_gaps


def small_cfg(**overrides) -> ModelConfig:
    base = dict(
        embedding_dim=8,
        num_blocks=2,
        num_heads=2,
        attention_dim=3,
        linear_dim=4,
        dropout=0.0,
        max_seq_len=12,
        num_time_buckets=40,
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def randomize_biases(model: HSTU, seed: int = 1) -> None:
    """The N(0, 0.02) initial biases are too small for tests to notice a wrong index; make them O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.layers:
            for p in (layer.position_bias, layer.time_bias):
                if p is not None:
                    p.copy_(torch.randn(p.shape, generator=gen))


# ----------------------------------------------------------------------------------------- time buckets


def test_time_buckets_hand_computed_base_2():
    dt = torch.tensor([0, 1, -1, 2, 3, -3, 4, 7, 8, -8, 15, 16, 1000, -(10**9)])
    expected = [0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 4, 4, 4]  # floor(log2 |dt|), clipped to 4
    assert time_buckets(dt, num_buckets=5, base=2.0).tolist() == expected


def test_time_buckets_exact_at_powers_of_the_base():
    # log(1000) / log(10) is 2.9999999999999996 in float64; the bucket must still be 3.
    dt = torch.tensor([9, 10, 99, 100, 999, 1000, 10**6 - 1, 10**6])
    assert time_buckets(dt, num_buckets=10, base=10.0).tolist() == [0, 1, 1, 2, 2, 3, 5, 6]


def test_time_buckets_default_base_matches_reference_formula():
    # The reference: (log(max(1, |dt|)) / 0.301).long(); one hour -> 27, one day -> 37.
    base = DEFAULT_TIME_BUCKET_BASE
    assert time_buckets(torch.tensor([1, 2, 3600, 86400]), 128, base).tolist() == [0, 2, 27, 37]
    dt = torch.randint(-(10**9), 10**9, (5000,), generator=torch.Generator().manual_seed(0))
    reference = (torch.log(dt.abs().clamp(min=1).double()) / 0.301).long().clamp(max=127)
    assert torch.equal(time_buckets(dt, 128, base), reference)


def test_time_buckets_float_and_int32_gaps_agree_with_int64():
    dt = torch.tensor([0, 1, 2, 3, 4, 7, 8, 9, 1000, -1000, 123456789])
    expected = time_buckets(dt, 30, 2.0)
    assert expected.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 9, 9, 26]
    assert torch.equal(time_buckets(dt.to(torch.int32), 30, 2.0), expected)
    assert torch.equal(time_buckets(dt.to(torch.float64), 30, 2.0), expected)
    # A fractional gap just below a boundary stays in the lower bucket.
    assert time_buckets(torch.tensor([7.99, 8.0]), 30, 2.0).tolist() == [2, 3]
    # Huge bases overflow float; the buckets past the overflow are simply never reached.
    assert time_buckets(torch.tensor([10**18]), 200, 1e3).tolist() == [6]


def test_time_buckets_rejects_bad_arguments():
    with pytest.raises(ValueError, match="base"):
        time_buckets(torch.tensor([5]), 10, 1.0)
    with pytest.raises(ValueError, match="num_buckets"):
        time_buckets(torch.tensor([5]), 0, 2.0)


# ----------------------------------------------------------------------------- brute-force reference


def brute_force_hstu(model: HSTU, item_emb, offsets, timestamps, target_timestamps, scale_len: int):
    """Per sequence, per head, per (i, j) pair, straight from the formulas in train/models/hstu.py."""
    cfg = model.cfg
    heads, d_qk, d_v, dim = cfg.num_heads, cfg.attention_dim, cfg.linear_dim, cfg.embedding_dim
    outputs = []
    for b in range(offsets.numel() - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        length = end - start
        x = item_emb[start:end] * math.sqrt(dim) + model.pos_emb.weight[:length]
        for layer in model.layers:
            proj = F.silu(F.layer_norm(x, (dim,), eps=1e-6) @ layer.uvqk)
            u, v = proj[:, : heads * d_v], proj[:, heads * d_v : 2 * heads * d_v]
            q = proj[:, 2 * heads * d_v : 2 * heads * d_v + heads * d_qk]
            k = proj[:, 2 * heads * d_v + heads * d_qk :]
            attn = torch.zeros(length, heads * d_v, dtype=x.dtype)
            for h in range(heads):
                for i in range(length):
                    for j in range(i + 1):
                        score = q[i, h * d_qk : (h + 1) * d_qk] @ k[j, h * d_qk : (h + 1) * d_qk]
                        if layer.position_bias is not None:
                            score = score + layer.position_bias[min(i - j, cfg.max_seq_len - 1)]
                        if layer.time_bias is not None and timestamps is not None:
                            query_times = target_timestamps if cfg.time_gap_from == "target" else timestamps
                            gap = abs(int(query_times[start + i]) - int(timestamps[start + j]))
                            bucket = min(
                                cfg.num_time_buckets - 1,
                                math.floor(math.log(max(1, gap)) / math.log(cfg.time_bucket_base)),
                            )
                            score = score + layer.time_bias[bucket]
                        weight = F.silu(score) / scale_len
                        attn[i, h * d_v : (h + 1) * d_v] += weight * v[j, h * d_v : (h + 1) * d_v]
            x = x + layer.output(u * F.layer_norm(attn, (heads * d_v,), eps=1e-6))
        outputs.append(F.normalize(x, dim=-1, eps=1e-6))
    return torch.cat(outputs)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"use_time_bias": False},
        {"use_position_bias": False},
        {"num_heads": 1, "attention_dim": 8, "linear_dim": 8, "max_seq_len": 5},  # distances clip at 4
        {"time_gap_from": "input"},
        {"time_gap_from": "input", "use_position_bias": False},
    ],
)
def test_matches_brute_force(overrides):
    cfg = small_cfg(**overrides)
    torch.manual_seed(0)
    model = HSTU(cfg).eval()
    randomize_biases(model)
    lengths = [3, 1, 5] if cfg.max_seq_len == 5 else [3, 1, 7, 5]
    item_emb, offsets, max_len, ts, target_ts = make_batch(lengths, cfg.embedding_dim)
    # The brute force runs in float64 (fbgemm's CPU jagged kernels have no float64 version).
    with torch.no_grad():
        expected = brute_force_hstu(
            copy.deepcopy(model).double(), item_emb.double(), offsets, ts, target_ts, cfg.max_seq_len
        ).float()
        torch.testing.assert_close(
            model.forward_padded(item_emb, offsets, max_len, ts, target_ts), expected, atol=1e-5, rtol=1e-5
        )
        for min_size in (1, 16):
            got = grouped(model, min_size).forward_jagged(item_emb, offsets, max_len, ts, target_ts)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _layer_norm(values: list[float], eps: float = 1e-6) -> list[float]:
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return [(v - mean) / math.sqrt(var + eps) for v in values]


def _silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def _matvec(vec: list[float], mat: list[list[float]]) -> list[float]:
    """Row vector times matrix, ``vec @ mat``."""
    return [sum(vec[r] * mat[r][c] for r in range(len(vec))) for c in range(len(mat[0]))]


def test_one_layer_matches_the_paper_equations_computed_by_hand():
    """A 1-layer, 1-head HSTU with fixed weights against plain-Python arithmetic (no torch, no model
    code): the paper's equations, with the reference's input layer norm, for two sequences.

        U, V, Q, K = split(SiLU(LayerNorm(x) W_uvqk))
        A[i, j]    = SiLU(Q_i . K_j + rab[i - j]) / n   for j <= i, else 0
        y          = W_o (U * LayerNorm(A V)) + b_o + x,     output = y / |y|
    with x_t = e_t * sqrt(D) + p_t (item embedding scaled, plus the position embedding).
    """
    dim, d_qk, d_v, n = 3, 2, 2, 4  # n = model.max_seq_len divides the attention
    cfg = small_cfg(embedding_dim=dim, num_blocks=1, num_heads=1, attention_dim=d_qk, linear_dim=d_v,
                    max_seq_len=n, use_time_bias=False)  # fmt: skip
    w_uvqk = [  # D x (U | V | Q | K) = 3 x (2 + 2 + 2 + 2)
        [0.5, -0.3, 0.8, 0.1, 0.4, -0.6, 0.2, 0.7],
        [-0.2, 0.9, -0.4, 0.6, -0.5, 0.3, 0.8, -0.1],
        [0.7, 0.2, 0.3, -0.8, 0.6, 0.4, -0.3, 0.5],
    ]
    w_out = [[0.3, -0.7], [0.9, 0.2], [-0.4, 0.5]]  # nn.Linear(d_v, D): [D, d_v]
    b_out = [0.05, -0.1, 0.2]
    rab = [0.1, -0.2, 0.3, 0.4]  # position bias by distance i - j
    pos = [[0.2, -0.1, 0.0], [0.0, 0.3, -0.2], [-0.3, 0.1, 0.4], [0.1, 0.1, 0.1]]
    seqs = [  # two sequences (lengths 3 and 1) of item embeddings e_t
        [[0.5, -1.0, 0.25], [1.5, 0.5, -0.5], [-0.75, 0.0, 1.0]],
        [[0.3, 0.6, -0.9]],
    ]
    model = HSTU(cfg).eval()
    layer = model.layers[0]
    with torch.no_grad():
        layer.uvqk.copy_(torch.tensor(w_uvqk))
        layer.output.weight.copy_(torch.tensor(w_out))
        layer.output.bias.copy_(torch.tensor(b_out))
        layer.position_bias.copy_(torch.tensor(rab))
        model.pos_emb.weight.copy_(torch.tensor(pos))

    expected = []
    for seq in seqs:
        x = [[e * math.sqrt(dim) + p for e, p in zip(emb, pos[t])] for t, emb in enumerate(seq)]
        proj = [[_silu(z) for z in _matvec(_layer_norm(row), w_uvqk)] for row in x]
        u, v = [r[0:2] for r in proj], [r[2:4] for r in proj]
        q, k = [r[4:6] for r in proj], [r[6:8] for r in proj]
        for i in range(len(seq)):
            av = [0.0] * d_v
            for j in range(i + 1):
                a_ij = _silu(sum(qc * kc for qc, kc in zip(q[i], k[j])) + rab[i - j]) / n
                av = [acc + a_ij * vc for acc, vc in zip(av, v[j])]
            gated = [uc * nc for uc, nc in zip(u[i], _layer_norm(av))]
            y = [sum(w_out[r][c] * gated[c] for c in range(d_v)) + b_out[r] + x[i][r] for r in range(dim)]
            norm = math.sqrt(sum(c * c for c in y))
            expected.append([c / norm for c in y])
    expected = torch.tensor(expected)

    item_emb = torch.tensor([e for seq in seqs for e in seq])
    offsets = torch.tensor([0, 3, 4])
    with torch.no_grad():
        for path in (model.forward_jagged, model.forward_padded):
            torch.testing.assert_close(path(item_emb, offsets, 3), expected, atol=1e-5, rtol=1e-5)


def test_attn_scale_len_batch_divides_by_batch_max_len():
    cfg = small_cfg(attn_scale_len="batch")
    torch.manual_seed(0)
    model = HSTU(cfg).eval()
    item_emb, offsets, max_len, ts, target_ts = make_batch([4, 6], cfg.embedding_dim)
    with torch.no_grad():
        expected = brute_force_hstu(model, item_emb, offsets, ts, target_ts, scale_len=max_len)
        torch.testing.assert_close(
            model(item_emb, offsets, max_len, ts, target_ts), expected, atol=1e-5, rtol=1e-5
        )


# ----------------------------------------------------------------------------------- jagged vs padded


def test_plan_length_groups():
    lengths = [200, 200, 180, 150, 149, 100, 60, 59, 3, 0, 0]
    assert plan_length_groups(lengths, shrink=0.75, min_size=2) == [(0, 4), (4, 6), (6, 8), (8, 9)]
    assert plan_length_groups(lengths, shrink=0.75, min_size=4) == [(0, 4), (4, 8), (8, 9)]
    assert plan_length_groups(lengths, shrink=0.75, min_size=100) == [(0, 9)]
    assert plan_length_groups([0, 0], 0.75, 1) == []
    assert plan_length_groups([5], 0.75, 1) == [(0, 1)]


def grouped(model: HSTU, min_size: int) -> HSTU:
    """``min_size=1`` with shrink 0.9 splits even small test batches into several length groups."""
    model.length_group_min_size = min_size
    model.length_group_shrink = 0.9
    return model


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"num_heads": 1, "attention_dim": 8, "linear_dim": 8},
        {"use_time_bias": False, "use_position_bias": False},
        {"attn_scale_len": "batch"},
        {"time_gap_from": "input"},
    ],
)
@pytest.mark.parametrize("min_group_size", [1, 16])
def test_jagged_equals_padded_outputs_and_gradients(overrides, min_group_size):
    cfg = small_cfg(**overrides)
    torch.manual_seed(0)
    model = grouped(HSTU(cfg).eval(), min_group_size)
    randomize_biases(model)
    # Includes an empty sequence, a length-1 sequence and one at the batch max.
    item_emb, offsets, max_len, ts, target_ts = make_batch([5, 0, 1, 11, 7, 11], cfg.embedding_dim)
    results = []
    for forward in (model.forward_jagged, model.forward_padded):
        model.zero_grad()
        emb = item_emb.clone().requires_grad_(True)
        out = forward(emb, offsets, max_len, ts, target_ts)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters()}
        results.append((out.detach(), emb.grad, grads))
    (out_j, emb_grad_j, grads_j), (out_p, emb_grad_p, grads_p) = results
    assert out_j.shape == (int(offsets[-1]), cfg.embedding_dim)
    torch.testing.assert_close(out_j, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_grad_j, emb_grad_p, atol=1e-5, rtol=1e-4)
    for name in grads_j:
        torch.testing.assert_close(grads_j[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


def test_forward_dispatches_on_cfg_jagged(monkeypatch):
    batch = make_batch([3, 6], 8)
    torch.manual_seed(0)
    jagged = HSTU(small_cfg(jagged=True)).eval()
    padded = HSTU(small_cfg(jagged=False)).eval()
    padded.load_state_dict(jagged.state_dict())
    # Both paths give the same outputs, so count which one ran: the comparison alone would pass
    # with model.jagged ignored.
    calls = []
    for path in ("forward_jagged", "forward_padded"):
        real = getattr(HSTU, path)
        monkeypatch.setattr(
            HSTU, path, lambda self, *a, _real=real, _path=path: calls.append(_path) or _real(self, *a)
        )
    with torch.no_grad():
        out_jagged = jagged(*batch)
        assert calls == ["forward_jagged"]
        out_padded = padded(*batch)
        assert calls == ["forward_jagged", "forward_padded"]
    torch.testing.assert_close(out_jagged, out_padded)


# ------------------------------------------------------------------------------ causality, batching


@pytest.mark.parametrize("path", ["forward_jagged", "forward_padded"])
def test_causal_and_independent_of_other_sequences(path):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = grouped(HSTU(cfg).eval(), min_size=1)
    randomize_biases(model)
    check_causal_and_independent(getattr(model, path), cfg.embedding_dim)


def check_causal_and_independent(forward, dim: int) -> None:
    """Changing a sequence after position 3 (items, their times and their targets' times) changes
    nothing before it nor in other sequences, and a sequence encoded alone gives the same outputs as
    inside the batch."""
    item_emb, offsets, max_len, timestamps, target_ts = make_batch([6, 9, 4, 9, 2], dim)
    with torch.no_grad():
        base = forward(item_emb, offsets, max_len, timestamps, target_ts)
        cut, end = int(offsets[1]) + 4, int(offsets[2])
        emb2, ts2, target_ts2 = item_emb.clone(), timestamps.clone(), target_ts.clone()
        emb2[cut:end] = torch.randn(end - cut, dim)
        ts2[cut:end] += 12345
        target_ts2[cut:end] += 12345
        changed = forward(emb2, offsets, max_len, ts2, target_ts2)
        torch.testing.assert_close(changed[:cut], base[:cut], atol=1e-6, rtol=0)
        torch.testing.assert_close(changed[end:], base[end:], atol=1e-6, rtol=0)
        assert (changed[cut:end] - base[cut:end]).abs().max() > 1e-3
        for b in range(offsets.numel() - 1):
            s, e = int(offsets[b]), int(offsets[b + 1])
            alone = forward(item_emb[s:e], torch.tensor([0, e - s]), e - s, timestamps[s:e], target_ts[s:e])
            torch.testing.assert_close(alone, base[s:e], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------ gradients, fallbacks, errors


def test_gradients_reach_every_parameter_in_train_mode():
    cfg = small_cfg(dropout=0.2, attn_dropout=0.1)
    torch.manual_seed(0)
    model = HSTU(cfg).train()
    item_emb, offsets, max_len, ts, target_ts = make_batch([5, 8, 2], cfg.embedding_dim)
    item_emb.requires_grad_(True)
    out = model(item_emb, offsets, max_len, ts, target_ts)
    (out @ torch.randn(cfg.embedding_dim)).sum().backward()
    assert item_emb.grad is not None and item_emb.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name != "pos_emb.weight":  # rows past the longest sequence get no gradient, the rest must
            assert p.grad.abs().sum() > 0, name


def test_gather_bias_backward_matches_autograd_indexing():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(30, dtype=torch.float64, generator=gen, requires_grad=True)
    index = torch.randint(0, 30, (4, 7, 7), generator=gen)
    upstream = torch.randn(4, 7, 7, dtype=torch.float64, generator=gen)
    (grad_fast,) = torch.autograd.grad((_GatherBias.apply(table, index) * upstream).sum(), table)
    (grad_ref,) = torch.autograd.grad((table[index] * upstream).sum(), table)
    torch.testing.assert_close(grad_fast, grad_ref)


def test_no_timestamps_falls_back_to_position_bias_and_logs_once(caplog):
    cfg = small_cfg()
    torch.manual_seed(0)
    model = HSTU(cfg).eval()
    randomize_biases(model)
    positions_only = HSTU(small_cfg(use_time_bias=False)).eval()
    missing, unexpected = positions_only.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all("time_bias" in key for key in unexpected)
    item_emb, offsets, max_len, ts, target_ts = make_batch([4, 7], cfg.embedding_dim)
    with caplog.at_level(logging.WARNING, logger="train.models.hstu"), torch.no_grad():
        out1 = model(item_emb, offsets, max_len, None)
        out2 = model.forward_padded(item_emb, offsets, max_len, None)
        with_time = model(item_emb, offsets, max_len, ts, target_ts)
    warnings = [r for r in caplog.records if "no timestamps" in r.getMessage()]
    assert len(warnings) == 1
    expected = positions_only(item_emb, offsets, max_len, None)
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected, atol=1e-5, rtol=1e-5)
    assert (with_time - out1).abs().max() > 1e-3  # the time bias does change the outputs


def test_bad_inputs_raise_value_error():
    model = HSTU(small_cfg()).eval()
    item_emb, offsets, max_len, ts, target_ts = make_batch([4, 7], 8)
    with pytest.raises(ValueError, match="model.max_seq_len"):
        model(item_emb, offsets, 13, ts, target_ts)
    with pytest.raises(ValueError, match="embedding_dim"):
        model(item_emb[:, :4], offsets, max_len, ts, target_ts)
    with pytest.raises(ValueError, match="^timestamps"):
        model(item_emb, offsets, max_len, ts[:-1], target_ts)
    with pytest.raises(ValueError, match="^target_timestamps: expected"):
        model(item_emb, offsets, max_len, ts, target_ts[:-1])
    with pytest.raises(ValueError, match="^target_timestamps: model.time_gap_from=target"):
        model(item_emb, offsets, max_len, ts)


def test_config_validation_and_build_encoder(tmp_path):
    cfg = load_config(ModelConfig, None, ["name=sasrec", "num_blocks=3", "jagged=false"])
    encoder = build_encoder(cfg)
    assert isinstance(encoder, SASRec) and len(encoder.blocks) == 3 and not cfg.jagged
    assert isinstance(build_encoder(ModelConfig()), HSTU)
    bad = [
        (["dropout=1.0"], "model.dropout"),
        (["num_blocks=0"], "model.num_blocks"),
        (["time_bucket_base=1"], "model.time_bucket_base"),
        (["name=sasrec", "embedding_dim=50", "num_heads=3"], "model.num_heads"),
        (["name=gpt"], "name"),
        (["attn_scale_len=foo"], "attn_scale_len"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError, match=key):
            load_config(ModelConfig, None, overrides)
    with pytest.raises(ConfigError, match="model.num_heads"):
        build_encoder(ModelConfig(name="sasrec", num_heads=7))
