"""Sampled / in-batch softmax and binary losses against brute-force per-row computations; negative sampling."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from train.models.losses import (
    full_softmax_loss,
    in_batch_softmax_loss,
    sample_negatives,
    sampled_binary_loss,
    sampled_softmax_loss,
)


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


def brute_force_loss(query, pos_emb, pos_ids, negatives, temperature):
    """``negatives``: per row, a list of (id, embedding). Plain Python log-sum-exp per row."""
    total = 0.0
    for i in range(query.shape[0]):
        q = query[i].tolist()

        def logit(e, q=q):
            e = unit(e).tolist()
            return sum(a * b for a, b in zip(q, e)) / temperature

        pos_logit = logit(pos_emb[i])
        logits = [pos_logit] + [logit(e) for item, e in negatives[i] if item != int(pos_ids[i])]
        top = max(logits)
        total += -(pos_logit - top - math.log(sum(math.exp(z - top) for z in logits)))
    return total


def make_inputs(num_pos=6, num_neg=5, dim=4, num_items=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = unit(torch.randn(num_pos, dim, generator=gen, dtype=torch.float64))
    # Item embeddings come from a small table so that equal ids have equal embeddings.
    table = torch.randn(num_items + 1, dim, generator=gen, dtype=torch.float64) * 3
    pos_ids = torch.randint(1, num_items + 1, (num_pos,), generator=gen)
    return query, table, pos_ids, gen


def test_per_position_negatives_match_brute_force_and_mask_hits():
    query, table, pos_ids, gen = make_inputs()
    neg_ids = torch.randint(1, 8, (6, 5), generator=gen)
    neg_ids[0, 2] = pos_ids[0]  # make sure accidental hits are present
    neg_ids[3, :2] = pos_ids[3]
    loss, count = sampled_softmax_loss(
        query, table[pos_ids], pos_ids, table[neg_ids], neg_ids, temperature=0.5
    )
    negatives = [[(int(n), table[n]) for n in row] for row in neg_ids]
    expected = brute_force_loss(query, table[pos_ids], pos_ids, negatives, 0.5)
    assert count.item() == 6 and count.dtype == torch.int64
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    # Without masking, hits would count as negatives and the loss would differ.
    unmasked = brute_force_loss(query, table[pos_ids], torch.zeros_like(pos_ids), negatives, 0.5)
    assert abs(unmasked - expected) > 1e-3


def test_shared_negatives_match_brute_force():
    query, table, pos_ids, gen = make_inputs(num_pos=9)
    neg_ids = torch.tensor([1, 2, 3, 4, 5, 6, 7, 2])
    loss, count = sampled_softmax_loss(
        query, table[pos_ids], pos_ids, table[neg_ids], neg_ids, temperature=0.05
    )
    negatives = [[(int(n), table[n]) for n in neg_ids]] * 9
    assert count.item() == 9
    assert loss.item() == pytest.approx(
        brute_force_loss(query, table[pos_ids], pos_ids, negatives, 0.05), rel=1e-10
    )
    # Shared [K, D] negatives give the same loss as the same negatives repeated per position.
    per_position, _ = sampled_softmax_loss(
        query, table[pos_ids], pos_ids, table[neg_ids].expand(9, -1, -1), neg_ids.expand(9, -1), 0.05
    )
    torch.testing.assert_close(loss, per_position)


def test_full_softmax_matches_brute_force_and_shared_negatives_over_all_items():
    query, table, pos_ids, _ = make_inputs(num_pos=9, num_items=7)
    table.requires_grad_(True)
    loss, count = full_softmax_loss(query, table[1:], pos_ids, temperature=0.05)
    negatives = [[(i, table[i].detach()) for i in range(1, 8)]] * 9
    assert count.item() == 9
    assert loss.item() == pytest.approx(
        brute_force_loss(query, table[pos_ids].detach(), pos_ids, negatives, 0.05), rel=1e-10
    )
    # Same value and same table gradient as the masked shared path with negatives 1..I.
    (grad_full,) = torch.autograd.grad(loss, table)
    all_ids = torch.arange(1, 8)
    shared, _ = sampled_softmax_loss(query, table[pos_ids], pos_ids, table[all_ids], all_ids, 0.05)
    (grad_shared,) = torch.autograd.grad(shared, table)
    torch.testing.assert_close(loss, shared)
    torch.testing.assert_close(grad_full, grad_shared)
    # The table must hold items 1..I in id order: a shifted table gives another loss.
    shifted, _ = full_softmax_loss(query, table[:-1], pos_ids, temperature=0.05)
    assert abs(shifted.item() - loss.item()) > 1e-3


def test_all_negatives_hit_gives_zero_loss_and_finite_gradients():
    query, table, _, _ = make_inputs(num_pos=2)
    pos_ids = torch.tensor([3, 3])
    neg_ids = torch.tensor([[3, 3], [3, 3]])
    emb = table.clone().requires_grad_(True)
    q = query.clone().requires_grad_(True)
    loss, _ = sampled_softmax_loss(q, emb[pos_ids], pos_ids, emb[neg_ids], neg_ids, temperature=0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    assert torch.isfinite(emb.grad).all() and torch.isfinite(q.grad).all()


def test_item_embeddings_are_normalised_inside():
    query, table, pos_ids, gen = make_inputs()
    neg_ids = torch.randint(1, 8, (6, 5), generator=gen)
    a, _ = sampled_softmax_loss(query, table[pos_ids], pos_ids, table[neg_ids], neg_ids, 0.2)
    b, _ = sampled_softmax_loss(query, 7 * table[pos_ids], pos_ids, 0.1 * table[neg_ids], neg_ids, 0.2)
    torch.testing.assert_close(a, b)


def test_gradient_matches_autograd_of_reference_formula():
    query, table, pos_ids, gen = make_inputs()
    neg_ids = torch.randint(1, 8, (5,), generator=gen)
    q = query.clone().requires_grad_(True)
    loss, _ = sampled_softmax_loss(q, table[pos_ids], pos_ids, table[neg_ids], neg_ids, 0.3)
    (grad,) = torch.autograd.grad(loss, q)
    # Reference: cross entropy over [positive, negatives] with hits removed by a large negative number.
    logits = (
        torch.cat([(q * unit(table[pos_ids])).sum(-1, keepdim=True), q @ unit(table[neg_ids]).T], 1) / 0.3
    )
    logits[:, 1:] = logits[:, 1:].masked_fill(neg_ids[None, :] == pos_ids[:, None], -1e9)
    (grad_ref,) = torch.autograd.grad(
        F.cross_entropy(logits, torch.zeros(6, dtype=torch.long), reduction="sum"), q
    )
    torch.testing.assert_close(grad, grad_ref)


def test_in_batch_negatives_match_brute_force():
    query, table, pos_ids, _ = make_inputs(num_pos=8, num_items=4)  # few items: many same-id pairs
    assert len(set(pos_ids.tolist())) < 8
    loss, count = in_batch_softmax_loss(query, table[pos_ids], pos_ids, temperature=0.1)
    negatives = [[(int(pos_ids[j]), table[pos_ids[j]]) for j in range(8) if j != i] for i in range(8)]
    assert count.item() == 8
    assert loss.item() == pytest.approx(
        brute_force_loss(query, table[pos_ids], pos_ids, negatives, 0.1), rel=1e-10
    )


def test_bad_shapes_and_temperature_raise_value_error():
    query, table, pos_ids, _ = make_inputs()
    with pytest.raises(ValueError, match="temperature"):
        sampled_softmax_loss(query, table[pos_ids], pos_ids, table[:3], torch.arange(3), 0.0)
    with pytest.raises(ValueError, match="neg_ids"):
        sampled_softmax_loss(query, table[pos_ids], pos_ids, table[:3], torch.arange(4), 0.1)
    with pytest.raises(ValueError, match="pos_emb"):
        in_batch_softmax_loss(query, table[pos_ids][:, :2], pos_ids, 0.1)


def brute_force_binary(query, table, pos_ids, neg_ids_NK, temperature, drop_hits=True):
    """Position by position: the target's logit with label 1 and each negative's (not the target's id
    unless ``drop_hits=False``) with label 0, through torch's binary_cross_entropy_with_logits."""
    total = 0.0
    for i in range(query.shape[0]):
        pos = int(pos_ids[i])
        ids = [pos] + [int(n) for n in neg_ids_NK[i] if int(n) != pos or not drop_hits]
        logits = torch.stack([query[i] @ unit(table[j]) for j in ids]) / temperature
        labels = torch.zeros(len(ids), dtype=logits.dtype)
        labels[0] = 1.0
        total = total + F.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    return total


def test_binary_loss_matches_brute_force_per_position_and_shared_with_hits():
    query, table, pos_ids, gen = make_inputs(num_pos=7, num_neg=4)
    neg_ids = torch.randint(1, 8, (7, 4), generator=gen)
    neg_ids[0, 1] = pos_ids[0]  # accidental hits: dropped, as in the softmax
    neg_ids[5, :] = pos_ids[5]  # every negative a hit: only the positive's term is left
    loss, count = sampled_binary_loss(query, table[pos_ids], pos_ids, table[neg_ids], neg_ids, 0.5)
    assert count.item() == 7 and count.dtype == torch.int64
    expected = brute_force_binary(query, table, pos_ids, neg_ids, 0.5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    # Counting the hits as negatives would give another number.
    unmasked = brute_force_binary(query, table, pos_ids, neg_ids, 0.5, drop_hits=False)
    assert abs(unmasked.item() - expected.item()) > 1e-3
    # Shared [K] negatives: the same draw for every position (one of them a hit for some positions).
    shared = torch.cat([pos_ids[:1], torch.randint(1, 8, (5,), generator=gen)])
    loss, _ = sampled_binary_loss(query, table[pos_ids], pos_ids, table[shared], shared, 0.05)
    expected = brute_force_binary(query, table, pos_ids, shared.expand(7, -1), 0.05)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


def test_binary_loss_one_negative_is_sasrec_eq_5():
    """One negative per position, no hit: -log sigmoid(s+) - log(1 - sigmoid(s-)) written out."""
    query, table, _, _ = make_inputs(num_pos=3)
    pos_ids, neg_ids = torch.tensor([1, 2, 3]), torch.tensor([[4], [5], [6]])
    loss, _ = sampled_binary_loss(query, table[pos_ids], pos_ids, table[neg_ids], neg_ids, 0.2)
    s_pos = (query * unit(table[pos_ids])).sum(-1) / 0.2
    s_neg = (query * unit(table[neg_ids[:, 0]])).sum(-1) / 0.2
    expected = -(torch.log(torch.sigmoid(s_pos)) + torch.log(1 - torch.sigmoid(s_neg))).sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)


@pytest.mark.parametrize("shared", [False, True])
def test_binary_loss_gradient_matches_brute_force(shared):
    query, table, pos_ids, gen = make_inputs(num_pos=6, num_neg=3)
    neg_ids = torch.randint(1, 8, (3,) if shared else (6, 3), generator=gen)
    neg_ids.view(-1)[0] = pos_ids[0]  # a hit
    grads = []
    for fn in ("ours", "brute"):
        q, emb = query.clone().requires_grad_(True), table.clone().requires_grad_(True)
        if fn == "ours":
            loss, _ = sampled_binary_loss(q, emb[pos_ids], pos_ids, emb[neg_ids], neg_ids, 0.1)
        else:
            loss = brute_force_binary(q, emb, pos_ids, neg_ids.expand(6, -1) if shared else neg_ids, 0.1)
        grads.append(torch.autograd.grad(loss, [q, emb]))
    for ours, brute in zip(*grads):
        torch.testing.assert_close(ours, brute)


def test_binary_loss_refuses_bad_shapes():
    query, table, pos_ids, _ = make_inputs()
    with pytest.raises(ValueError, match="neg_ids"):
        sampled_binary_loss(query, table[pos_ids], pos_ids, table[:3], torch.arange(4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        sampled_binary_loss(query, table[pos_ids], pos_ids, table[:3], torch.arange(3), -1.0)


@pytest.mark.parametrize("negatives", ["full", "in_batch"])
def test_binary_loss_without_sampled_negatives_is_one_config_error(negatives):
    from cluster.config import ConfigError
    from train.config import load_train_config

    with pytest.raises(ConfigError, match="loss.function") as err:
        load_train_config(None, ["loss.function=binary", f"loss.negatives={negatives}"])
    message = str(err.value)
    assert "\n" not in message and negatives in message and "per_position" in message
    for ok in ("per_position", "shared"):
        cfg = load_train_config(
            None, ["loss.function=binary", f"loss.negatives={ok}", "loss.num_negatives=1"]
        )
        assert cfg.loss.describe() == f"binary {ok}(1)"
    with pytest.raises(ConfigError, match="loss.function"):
        load_train_config(None, ["loss.function=hinge"])


def test_sample_negatives_uniform_over_1_to_num_items():
    ids = sample_negatives(5, (200, 50), torch.Generator().manual_seed(0))
    assert ids.shape == (200, 50) and ids.dtype == torch.int64
    counts = torch.bincount(ids.flatten(), minlength=6)
    assert counts[0] == 0 and ids.max() == 5
    # 2000 draws per id expected, standard deviation 40.
    assert (counts[1:] - 2000).abs().max() < 200
    again = sample_negatives(5, (200, 50), torch.Generator().manual_seed(0))
    assert torch.equal(ids, again)
    with pytest.raises(ValueError, match="num_items"):
        sample_negatives(0, (3,))
