"""SASRec encoder: jagged vs padded reference vs a brute-force loop, causality, gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from train.models import SASRec, build_encoder
from train.models.config import ModelConfig


def make_batch(lengths: list[int], dim: int, seed: int = 0):
    """Random jagged batch: item embeddings [T, dim], offsets [B + 1], timestamps [T]."""
    gen = torch.Generator().manual_seed(seed)
    lengths_B = torch.tensor(lengths, dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths_B.cumsum(0)])
    num_tokens = int(offsets[-1])
    item_emb = torch.randn(num_tokens, dim, generator=gen)
    timestamps = torch.arange(num_tokens, dtype=torch.int64) * 1000
    return item_emb, offsets, max(lengths), timestamps


def small_cfg(**overrides) -> ModelConfig:
    base = dict(
        name="sasrec", embedding_dim=8, num_blocks=2, num_heads=2, ffn_dim=6, dropout=0.0, max_seq_len=12
    )
    base.update(overrides)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def brute_force_sasrec(model: SASRec, item_emb, offsets):
    """Per sequence and head, explicit softmax over keys j <= i; formulas of train/models/sasrec.py."""
    dim, heads = model.cfg.embedding_dim, model.cfg.num_heads
    head_dim = dim // heads
    outputs = []
    for b in range(offsets.numel() - 1):
        start, end = int(offsets[b]), int(offsets[b + 1])
        length = end - start
        x = item_emb[start:end] * math.sqrt(dim) + model.pos_emb.weight[:length]
        for block in model.blocks:
            q_in = F.layer_norm(x, (dim,), eps=1e-8)
            q = block.query(q_in)
            k, v = block.key_value(x).chunk(2, dim=-1)
            attn = torch.zeros(length, dim, dtype=x.dtype)
            for h in range(heads):
                cols = slice(h * head_dim, (h + 1) * head_dim)
                for i in range(length):
                    scores = torch.stack([q[i, cols] @ k[j, cols] for j in range(i + 1)]) / math.sqrt(
                        head_dim
                    )
                    weights = torch.softmax(scores, dim=0)
                    attn[i, cols] = sum(weights[j] * v[j, cols] for j in range(i + 1))
            h_ = F.layer_norm(q_in + block.attn_output(attn), (dim,), eps=1e-8)
            x = h_ + block.ffn(h_)
        outputs.append(F.normalize(x, dim=-1, eps=1e-6))
    return torch.cat(outputs)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_matches_brute_force(num_heads):
    cfg = small_cfg(num_heads=num_heads)
    torch.manual_seed(0)
    model = SASRec(cfg).eval()
    item_emb, offsets, max_len, timestamps = make_batch([3, 1, 7, 5], cfg.embedding_dim)
    with torch.no_grad():
        expected = brute_force_sasrec(copy.deepcopy(model).double(), item_emb.double(), offsets).float()
        for forward in (model.forward_jagged, model.forward_padded):
            torch.testing.assert_close(
                forward(item_emb, offsets, max_len, timestamps), expected, atol=1e-5, rtol=1e-5
            )


def test_jagged_equals_padded_outputs_and_gradients():
    cfg = small_cfg()
    torch.manual_seed(0)
    model = SASRec(cfg).eval()
    item_emb, offsets, max_len, _ = make_batch([5, 0, 1, 11, 7, 11], cfg.embedding_dim)
    results = []
    for forward in (model.forward_jagged, model.forward_padded):
        model.zero_grad()
        emb = item_emb.clone().requires_grad_(True)
        out = forward(emb, offsets, max_len)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        results.append((out.detach(), emb.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (out_j, emb_grad_j, grads_j), (out_p, emb_grad_p, grads_p) = results
    assert torch.isfinite(out_p).all()  # the empty sequence must not produce NaN in the padded path
    torch.testing.assert_close(out_j, out_p, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb_grad_j, emb_grad_p, atol=1e-5, rtol=1e-4)
    for name in grads_j:
        torch.testing.assert_close(grads_j[name], grads_p[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("path", ["forward_jagged", "forward_padded"])
def test_causal_and_independent_of_other_sequences(path):
    """Changing a sequence after position 3 changes nothing before it nor in other sequences, and a
    sequence encoded alone gives the same outputs as inside the batch."""
    torch.manual_seed(0)
    model = SASRec(small_cfg()).eval()
    forward = getattr(model, path)
    item_emb, offsets, max_len, _ = make_batch([6, 9, 4], 8)
    with torch.no_grad():
        base = forward(item_emb, offsets, max_len)
        cut, end = int(offsets[1]) + 4, int(offsets[2])
        emb2 = item_emb.clone()
        emb2[cut:end] = torch.randn(end - cut, 8)
        changed = forward(emb2, offsets, max_len)
        torch.testing.assert_close(changed[:cut], base[:cut], atol=1e-6, rtol=0)
        torch.testing.assert_close(changed[end:], base[end:], atol=1e-6, rtol=0)
        assert (changed[cut:end] - base[cut:end]).abs().max() > 1e-3
        for b in range(offsets.numel() - 1):
            s, e = int(offsets[b]), int(offsets[b + 1])
            alone = forward(item_emb[s:e], torch.tensor([0, e - s]), e - s)
            torch.testing.assert_close(alone, base[s:e], atol=1e-5, rtol=1e-5)


def test_timestamps_are_ignored_and_outputs_normalised():
    model = build_encoder(small_cfg()).eval()
    item_emb, offsets, max_len, timestamps = make_batch([4, 9], 8)
    with torch.no_grad():
        with_ts = model(item_emb, offsets, max_len, timestamps)
        without = model(item_emb, offsets, max_len, None)
    torch.testing.assert_close(with_ts, without)
    torch.testing.assert_close(with_ts.norm(dim=-1), torch.ones(with_ts.shape[0]))


def test_gradients_reach_every_parameter_in_train_mode():
    cfg = small_cfg(dropout=0.2, attn_dropout=0.2)
    torch.manual_seed(0)
    model = SASRec(cfg).train()
    item_emb, offsets, max_len, _ = make_batch([5, 8, 2], cfg.embedding_dim)
    item_emb.requires_grad_(True)
    out = model(item_emb, offsets, max_len)
    (out @ torch.randn(cfg.embedding_dim)).sum().backward()
    assert item_emb.grad.abs().sum() > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
