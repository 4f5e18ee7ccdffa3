"""TIGER: the encoder-decoder, its token ids, the prefix trie and (constrained) beam search.

Beam search is checked against exhaustive scoring of every item's full tuple with the plain
teacher-forced ``forward`` (a separate code path from the beam's incremental, beam-folded decode).
"""

from __future__ import annotations

import inspect
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cluster.config import ConfigError
from train.models.beam_search import SemanticIdTrie, beam_search
from train.models.tiger import (
    PAD_TOKEN,
    Tiger,
    TigerConfig,
    TigerVocab,
    codes_for_vocab,
    decoder_input_ids,
    encoder_input_ids,
    make_step_fn,
    tiger_loss,
    user_bucket,
)

SIZES = [4, 6, 8]
NUM_USER_BUCKETS = 10


def _catalogue(num_items=60, sizes=SIZES, seed=0) -> np.ndarray:
    """``num_items`` distinct random tuples out of the prod(sizes) possible ones."""
    rng = np.random.default_rng(seed)
    all_tuples = np.array(list(itertools.product(*[range(v) for v in sizes])))
    return all_tuples[rng.choice(len(all_tuples), num_items, replace=False)]


def _tiny(sizes=SIZES, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    cfg = TigerConfig(
        num_encoder_layers=2, num_decoder_layers=2, num_heads=2, head_dim=8, d_model=32, d_ff=64,
        dropout=dropout, num_user_buckets=NUM_USER_BUCKETS, relative_num_buckets=8, relative_max_distance=16,
    )  # fmt: skip
    model = Tiger(cfg, sizes)
    vocab = TigerVocab(tuple(sizes), NUM_USER_BUCKETS)
    embedding = nn.Embedding(vocab.vocab_size, cfg.d_model)
    nn.init.normal_(embedding.weight, std=1.0)
    return model.train(dropout > 0), vocab, embedding


def _encoder_batch(vocab, codes_NL, num_users=4, seed=1):
    """Random users with 1..5 history items each, as encoder token ids (via ``encoder_input_ids``)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (num_users,), generator=g)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    values = torch.randint(0, len(codes_NL), (int(offsets[-1]),), generator=g)
    buckets = torch.randint(0, NUM_USER_BUCKETS, (num_users,), generator=g)
    return encoder_input_ids(buckets, values, offsets, torch.as_tensor(codes_NL), vocab, max_history_items=4)


def _exhaustive_logprob(model, embedding, vocab, enc_ids_BS, enc_mask_BS, codes_NL) -> torch.Tensor:
    """[B, N] log-likelihood of every item's full tuple, by teacher-forced ``forward`` per (user, item)."""
    b, n = enc_ids_BS.shape[0], len(codes_NL)
    codes = torch.as_tensor(codes_NL)
    dec_ids = decoder_input_ids(codes[:, :-1], vocab)  # [N, L]
    with torch.no_grad():
        logits = model(
            embedding(enc_ids_BS).repeat_interleave(n, 0),
            enc_mask_BS.repeat_interleave(n, 0),
            embedding(dec_ids).repeat(b, 1, 1),
        )
    logprob = torch.log_softmax(logits, -1).gather(-1, codes.repeat(b, 1)[..., None])[..., 0]
    return logprob.sum(-1).view(b, n)


def _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam, constrained=True, use_cache=True):
    with torch.no_grad():
        state = model.encode(embedding(enc_ids), enc_mask)
        step = make_step_fn(model, state, embedding, vocab, use_cache=use_cache)
        return beam_search(
            step, trie, enc_ids.shape[0], beam, len(vocab.codebook_sizes), constrained=constrained
        )


def test_config_validation_names_the_key():
    TigerConfig().validate()
    with pytest.raises(ConfigError, match="model.num_heads"):
        TigerConfig(num_heads=0).validate()
    with pytest.raises(ConfigError, match="model.dropout"):
        TigerConfig(dropout=1.0).validate()
    with pytest.raises(ConfigError, match="model.relative_num_buckets"):
        TigerConfig(relative_num_buckets=7).validate()


def test_token_ids_brute_force():
    vocab = TigerVocab((4, 6, 8), NUM_USER_BUCKETS)
    assert vocab.level_offsets == (12, 16, 22) and vocab.vocab_size == 30
    codes = torch.as_tensor(_catalogue())
    values = torch.tensor([5, 7, 1, 2, 3, 9, 11, 13])
    offsets = torch.tensor([0, 1, 1, 8])  # user 1 has no history
    buckets = torch.tensor([3, 0, 9])
    ids, mask = encoder_input_ids(buckets, values, offsets, codes, vocab, max_history_items=4)
    for b in range(3):
        history = values[offsets[b] : offsets[b + 1]].tolist()[-4:]
        expected = [2 + int(buckets[b])] + [
            vocab.level_offsets[lev] + int(codes[i, lev]) for i in history for lev in range(3)
        ]
        assert ids[b, : len(expected)].tolist() == expected
        assert mask[b].tolist() == [True] * len(expected) + [False] * (ids.shape[1] - len(expected))
        assert (ids[b, len(expected) :] == PAD_TOKEN).all()
    assert ids.shape[1] == 1 + 4 * 3
    dec = decoder_input_ids(codes[:2, :2], vocab)
    assert dec.tolist() == [[1, 12 + int(codes[i, 0]), 16 + int(codes[i, 1])] for i in range(2)]
    # codes_for_vocab: row d = the codes of dense id d, row 0 padding; unknown items are an error.
    table_ids = np.array(["a", "b", "c"], dtype=object)
    aligned = codes_for_vocab(table_ids, codes[:3].numpy(), ["c", "a"])
    assert aligned.tolist() == [[-1, -1, -1], codes[2].tolist(), codes[0].tolist()]
    with pytest.raises(
        ValueError, match=r"1 of 2 prepared items have no semantic ID \(e.g. raw ids \['z'\]\)"
    ):
        codes_for_vocab(table_ids, codes[:3].numpy(), ["a", "z"])


def test_trie_structure_and_lookup():
    codes = _catalogue()
    trie = SemanticIdTrie.from_codes(codes, SIZES)
    assert trie.nodes_per_level == [len({tuple(r[: d + 1]) for r in codes.tolist()}) for d in range(3)]
    all_tuples = torch.tensor(list(itertools.product(*[range(v) for v in SIZES])))
    row_of = {tuple(r): i for i, r in enumerate(codes.tolist())}
    expected = [row_of.get(tuple(t), -1) for t in all_tuples.tolist()]
    assert trie.lookup(all_tuples).tolist() == expected
    assert trie.lookup(torch.tensor([[4, 0, 0], [0, -1, 0]])).tolist() == [-1, -1]  # out of the codebooks
    with pytest.raises(ValueError, match="duplicate tuples"):
        SemanticIdTrie.from_codes(np.concatenate([codes, codes[:2]]), SIZES)


def test_wide_constrained_beam_equals_exhaustive_scoring():
    codes = _catalogue()
    model, vocab, embedding = _tiny()
    enc_ids, enc_mask = _encoder_batch(vocab, codes)
    trie = SemanticIdTrie.from_codes(codes, SIZES)
    nodes = trie.nodes_per_level
    assert nodes[0] <= 4 and nodes[1] <= 24 and nodes[2] == 60
    exhaustive_BN = _exhaustive_logprob(model, embedding, vocab, enc_ids, enc_mask, codes)
    ranked_BN = exhaustive_BN.sort(dim=1, descending=True).values
    # beam 24 keeps every prefix of the first two levels, so its top 24 is the exact top 24 of 60;
    # beam 60 returns the whole catalogue in likelihood order.
    for beam in (24, 60):
        res = _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam=beam)
        torch.testing.assert_close(res.logprob_BK, ranked_BN[:, :beam], atol=1e-5, rtol=0)
        torch.testing.assert_close(
            exhaustive_BN.gather(1, res.item_index_BK), res.logprob_BK, atol=1e-5, rtol=0
        )
        kth_B = ranked_BN[:, beam - 1]
        for b in range(len(enc_ids)):
            # Tie-safe: every item scored clearly above the K-th score is returned, and no item twice.
            must = set(torch.nonzero(exhaustive_BN[b] > kth_B[b] + 1e-5).flatten().tolist())
            assert must <= set(res.item_index_BK[b].tolist())
            assert len(set(res.item_index_BK[b].tolist())) == beam
    # A beam wider than the catalogue pads with -1 / -inf.
    res = _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam=64)
    assert (res.item_index_BK[:, 60:] == -1).all() and torch.isinf(res.logprob_BK[:, 60:]).all()
    assert sorted(res.item_index_BK[0, :60].tolist()) == list(range(60))


def test_narrow_constrained_beam_emits_only_valid_items():
    codes = _catalogue()
    model, vocab, embedding = _tiny(seed=3)
    enc_ids, enc_mask = _encoder_batch(vocab, codes, num_users=8, seed=5)
    trie = SemanticIdTrie.from_codes(codes, SIZES)
    exhaustive_BN = _exhaustive_logprob(model, embedding, vocab, enc_ids, enc_mask, codes)
    res = _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam=5)
    assert res.item_index_BK.shape == (8, 5) and res.invalid_rate == 0.0
    assert ((res.item_index_BK >= 0) & (res.item_index_BK < 60)).all()
    for b in range(8):
        assert len(set(res.item_index_BK[b].tolist())) == 5
    assert torch.equal(res.codes_BKL, torch.as_tensor(codes)[res.item_index_BK])
    torch.testing.assert_close(exhaustive_BN.gather(1, res.item_index_BK), res.logprob_BK, atol=1e-5, rtol=0)
    assert (res.logprob_BK[:, :-1] >= res.logprob_BK[:, 1:]).all()
    # The decoder cache (reordered by parent beam) gives the same search as recomputing every prefix.
    full = _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam=5, use_cache=False)
    assert torch.equal(full.item_index_BK, res.item_index_BK)
    torch.testing.assert_close(full.logprob_BK, res.logprob_BK, atol=1e-5, rtol=0)
    # Without the constraint the same model emits tuples that are not items (60 of 192 are), so the
    # constraint is doing something.
    free = _search(model, embedding, vocab, enc_ids, enc_mask, trie, beam=5, constrained=False)
    assert free.invalid_rate > 0 and (free.item_index_BK == -1).any()


def test_unconstrained_invalid_rate_on_a_constructed_case():
    """Level-independent probabilities p0[a] * p1[b]: the top-K tuples are known by brute force."""
    p0, p1 = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.6, 0.27, 0.13])
    items = np.array([[0, 0], [1, 1], [2, 0], [2, 2]])
    trie = SemanticIdTrie.from_codes(items, [3, 3])

    def step_fn(level, prefix_BKl, parent_BK):
        p = p0 if level == 0 else p1
        return p.log().expand(*prefix_BKl.shape[:2], 3)

    ranked = sorted(itertools.product(range(3), range(3)), key=lambda t: -(p0[t[0]] * p1[t[1]]).item())
    row_of = {tuple(r): i for i, r in enumerate(items.tolist())}
    for k in (1, 4, 6, 9):
        res = beam_search(step_fn, trie, batch_size=2, beam_size=k, num_levels=2, constrained=False)
        top = ranked[:k]
        assert [tuple(t) for t in res.codes_BKL[0].tolist()] == top
        assert res.item_index_BK[1].tolist() == [row_of.get(t, -1) for t in top]
        assert res.invalid_rate == pytest.approx(sum(t not in row_of for t in top) / k)
        expected = torch.tensor([(p0[a] * p1[b]).log().item() for a, b in top])
        torch.testing.assert_close(res.logprob_BK[0], expected)
    res = beam_search(step_fn, trie, batch_size=2, beam_size=9, num_levels=2, constrained=True)
    assert (
        sorted(res.item_index_BK[0, :4].tolist()) == [0, 1, 2, 3] and (res.item_index_BK[:, 4:] == -1).all()
    )


def test_decoder_is_causal_and_encoder_ignores_padding():
    model, vocab, embedding = _tiny(seed=2)
    codes = _catalogue()
    enc_ids, enc_mask = _encoder_batch(vocab, codes)
    assert not enc_mask.all()  # some rows are padded
    enc = embedding(enc_ids).detach()
    dec = embedding(decoder_input_ids(torch.as_tensor(codes[:4, :2]), vocab)).detach()
    with torch.no_grad():
        base = model(enc, enc_mask, dec)
        dec2 = dec.clone()
        dec2[:, 2] += 1.0
        changed = model(enc, enc_mask, dec2)
        enc2 = enc.clone()
        enc2[~enc_mask] = torch.randn_like(enc2[~enc_mask]) * 10
        padded = model(enc2, enc_mask, dec)
    torch.testing.assert_close(changed[:, :2], base[:, :2])
    assert not torch.allclose(changed[:, 2], base[:, 2])
    torch.testing.assert_close(padded, base)
    assert torch.isinf(base[:, 0, 4:]).all() and torch.isfinite(base[:, 2]).all()  # level 0 has 4 codes of 8


def test_user_bucket_is_stable_across_processes():
    ids = ["A1YJEY40YUW4SE", "1", "42", "user-007", ""]
    here = [user_bucket(u, 2000) for u in ids]
    # The function's own source, run without importing torch (which would take most of the test's time).
    code = f"import hashlib\n{inspect.getsource(user_bucket)}\nprint([user_bucket(u, 2000) for u in {ids!r}])"
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.append(proc.stdout.strip())
    assert outs[0] == outs[1] == str(here)
    buckets = [user_bucket(str(i), 2000) for i in range(5000)]
    assert min(buckets) >= 0 and max(buckets) < 2000 and len(set(buckets)) > 1500


def test_tiny_model_overfits_a_few_sequences():
    codes = _catalogue()
    model, vocab, embedding = _tiny(seed=4, dropout=0.1)
    enc_ids, enc_mask = _encoder_batch(vocab, codes, num_users=8, seed=7)
    targets = torch.as_tensor(codes[torch.randperm(60, generator=torch.Generator().manual_seed(0))[:8]])
    dec_ids = decoder_input_ids(targets[:, :-1], vocab)
    params = [*model.parameters(), *embedding.parameters()]
    opt = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for _ in range(150):
        loss = tiger_loss(model(embedding(enc_ids), enc_mask, embedding(dec_ids)), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])
    # The trained model's constrained beam puts each user's target first.
    model.eval()
    res = _search(model, embedding, vocab, enc_ids, enc_mask, SemanticIdTrie.from_codes(codes, SIZES), beam=5)
    assert torch.equal(res.codes_BKL[:, 0], targets)
