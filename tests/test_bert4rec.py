"""BERT4Rec's cloze task: the masks, the loss on masked positions only, and an evaluation that never
shows the target and never recommends the mask or padding rows.

The trainer-level checks (2 processes == 1, killed-and-resumed == uninterrupted, which also shows
that a resumed run masks what the uninterrupted one masked) are the family's parametrisations of
tests/test_trainer.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cluster.config import ConfigError
from tests.conftest import run_train
from train.batch import SequenceBatch
from train.config import load_train_config
from train.distributed import DistInfo
from train.models.bert4rec import Bert4Rec
from train.tasks.base import StepContext
from train.tasks.bert4rec import Bert4RecTask, cloze_mask
from train.tasks.retrieval import _EvalState

NUM_ITEMS = 30
DIM = 8


@dataclass
class PlainTableContext(StepContext):
    """A step context whose table lookup reads a plain tensor (the TorchRec path is tested elsewhere)."""

    weight: torch.Tensor | None = None

    def lookup(self, table, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids]


def make_task(*overrides: str) -> Bert4RecTask:
    cfg = load_train_config(
        None,
        ["model.name=bert4rec", f"model.embedding_dim={DIM}", "model.num_blocks=2", "model.num_heads=2",
         "model.ffn_dim=16", "model.dropout=0.0", "model.attn_dropout=0.0", "model.max_seq_len=6",
         "model.mask_prob=0.4", "loss.negatives=full", "run.seed=5", *overrides],
    )  # fmt: skip
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    return Bert4RecTask(cfg, info, {"num_items": NUM_ITEMS})


def make_batch(rows: list[list[int]], users: list[int] | None = None) -> SequenceBatch:
    lengths = torch.tensor([len(r) for r in rows])
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    users = users if users is not None else list(range(1, len(rows) + 1))
    return SequenceBatch(
        torch.tensor(users), torch.tensor([i for r in rows for i in r]), lengths, offsets, None
    )


ROWS = [[3, 7, 1, 9, 12, 4, 8, 30, 2], [5, 6], [11, 3, 3, 20], [1], [9, 8, 7, 6, 5, 4]]


def model_and_table(task: Bert4RecTask, seed: int = 0):
    torch.manual_seed(seed)
    model = task.build_dense().eval()
    weight = torch.randn(NUM_ITEMS + 2, DIM)  # rows 0 (pad), 1..30, 31 (mask)
    return model, weight


# ------------------------------------------------------------------------------------- masking


def test_masks_are_reproducible_layout_free_and_at_the_asked_rate():
    users, lengths = torch.arange(2000), torch.randint(2, 60, (2000,))
    a = cloze_mask(users, lengths, seed=1, step=7, mask_prob=0.3)
    assert torch.equal(a, cloze_mask(users, lengths, seed=1, step=7, mask_prob=0.3))  # a resumed run
    assert not torch.equal(a, cloze_mask(users, lengths, seed=2, step=7, mask_prob=0.3))
    assert not torch.equal(a, cloze_mask(users, lengths, seed=1, step=8, mask_prob=0.3))
    # Rows dealt in another order (another world size or rank) get the same masks.
    perm = torch.randperm(2000, generator=torch.Generator().manual_seed(0))
    b = cloze_mask(users[perm], lengths[perm], seed=1, step=7, mask_prob=0.3)
    rows_a, rows_b = torch.split(a, lengths.tolist()), torch.split(b, lengths[perm].tolist())
    for i in range(0, 2000, 97):
        assert torch.equal(rows_a[int(perm[i])], rows_b[i])
    # Every row has a mask; the rate is mask_prob plus the forced last masks of rows that drew none.
    assert all(bool(r.any()) for r in rows_a)
    forced = sum(float((1 - 0.3) ** n) for n in lengths.tolist())
    assert float(a.sum()) == pytest.approx(0.3 * float(lengths.sum()) + forced, rel=0.03)


# ---------------------------------------------------------------------------------------- loss


STEP, SEED = 3, 5  # the loss tests' step context (make_task sets run.seed=5)


def step_context(model, weight) -> PlainTableContext:
    return PlainTableContext(step=STEP, seed=SEED, rank=0, world_size=1, device=torch.device("cpu"), dense=model,
                             dense_dtype=torch.float32, grad_accum_steps=1, loss_scale=1.0, weight=weight)  # fmt: skip


def masked_row_queries(batch, model, weight):
    """Reference, row by row: ``(row, masked positions, query_TD)`` with the masks drawn from the same
    (seed, step, user, length, position) and the encoder on the masked row alone."""
    for user, row in zip(batch.user_ids.tolist(), ROWS):
        if len(row) < 2:
            continue  # no history to learn from (as in the retrieval task)
        row = row[-6:]  # model.max_seq_len
        masked = cloze_mask(torch.tensor([user]), torch.tensor([len(row)]), SEED, STEP, 0.4)
        inputs = torch.tensor([NUM_ITEMS + 1 if m else i for i, m in zip(row, masked.tolist())])
        query = model(weight[inputs], torch.tensor([0, len(row)]), len(row))
        yield row, torch.nonzero(masked).flatten().tolist(), query


def test_loss_counts_the_masked_positions_only():
    task = make_task()
    model, weight = model_and_table(task)
    batch = make_batch(ROWS)
    ctx = step_context(model, weight)
    loss_sum, num = task.train_loss(batch, ctx)
    # Reference: the exact softmax at each masked position over items 1..30.
    temperature = task.cfg.loss.temperature
    items = F.normalize(weight[1 : NUM_ITEMS + 1], dim=-1)
    want, count = 0.0, 0
    for row, masked_positions, query in masked_row_queries(batch, model, weight):
        for t in masked_positions:
            logits = query[t] @ items.T / temperature
            want += float(F.cross_entropy(logits[None], torch.tensor([row[t] - 1])))
            count += 1
    assert 0 < count < sum(min(len(r), 6) for r in ROWS if len(r) > 1)  # some positions are not masked
    assert int(num) == count == task.count_targets(batch, ctx)
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)


def test_binary_loss_at_the_masked_positions_matches_brute_force():
    """loss.function=binary reaches BERT4Rec's cloze loss: one binary term set per mask, against that
    position's sampled negatives (items 1..I), accidental hits dropped."""
    task = make_task("loss.function=binary", "loss.negatives=per_position", "loss.num_negatives=4")
    model, weight = model_and_table(task)
    batch = make_batch(ROWS)
    ctx = step_context(model, weight)
    loss_sum, num = task.train_loss(batch, ctx)
    temperature = task.cfg.loss.temperature
    neg_ids = task._negatives(int(num), ctx)  # the step's draw: a pure function of (seed, step, rank)
    assert neg_ids.shape == (int(num), 4) and 1 <= int(neg_ids.min()) and int(neg_ids.max()) <= NUM_ITEMS
    want, m = 0.0, 0
    for row, masked_positions, query in masked_row_queries(batch, model, weight):
        for t in masked_positions:
            ids = [row[t]] + [n for n in neg_ids[m].tolist() if n != row[t]]
            logits = torch.stack([query[t] @ F.normalize(weight[j], dim=0) for j in ids]) / temperature
            labels = torch.zeros(len(ids))
            labels[0] = 1.0
            want += float(F.binary_cross_entropy_with_logits(logits, labels, reduction="sum"))
            m += 1
    assert int(num) == m
    assert float(loss_sum) == pytest.approx(want, rel=1e-5)


# ---------------------------------------------------------------------------------- evaluation


def eval_state(task: Bert4RecTask, model, weight) -> _EvalState:
    return _EvalState(weight, F.normalize(weight, dim=-1), 0, model)


def test_the_target_is_invisible_to_the_encoder_at_evaluation():
    """Changing each row's held-out item (to one not in its history) leaves every score unchanged, and
    the new target's rank is the one the old scores give it. A target that reached the encoder (e.g.
    fed where the mask should be, or before it) would change the scores: the last check shows it."""
    task = make_task()
    model, weight = model_and_table(task)
    prepared = eval_state(task, model, weight)
    rows = [r for r in ROWS if len(r) >= 2]
    _, scores = task.eval_scores(make_batch(rows), prepared)
    swapped = [r[:-1] + [next(i for i in range(1, NUM_ITEMS + 1) if i not in r)] for r in rows]
    _, scores_swapped = task.eval_scores(make_batch(swapped), prepared)
    torch.testing.assert_close(scores, scores_swapped, rtol=0, atol=0)
    out = task.eval_batch(make_batch(swapped), prepared, top_k=None)
    for b, row in enumerate(swapped):
        history = set(row[-7:-1])  # the last max_seq_len history items are excluded
        s, t = scores[b], row[-1]
        want = sum(1 for i in range(1, NUM_ITEMS + 1) if i != t and i not in history and s[i] >= s[t])
        assert int(out.ranks[b]) == want
    # The control: the same encoder shown the target instead of the mask scores differently.
    row = rows[0]
    leak = torch.tensor(row[-6:])
    query_leak = model(weight[leak], torch.tensor([0, 6]), 6)[-1]
    assert not torch.allclose(query_leak @ prepared.unit_ID[: NUM_ITEMS + 1].T, scores[0])


def test_mask_and_padding_rows_are_never_recommended():
    """The mask and padding rows are given the best possible score (the query's own direction): the
    top lists still hold only items 1..30, and the target's rank is computed among items only."""
    task = make_task()
    model, weight = model_and_table(task)
    rows = [r for r in ROWS if len(r) >= 2]
    _, scores = task.eval_scores(make_batch(rows), eval_state(task, model, weight))
    for b, row in enumerate(rows):
        unit = F.normalize(weight, dim=-1).clone()
        # This row's query (the history's last 5 items, then the mask) is unit-norm: as a table row,
        # its cosine with the query is 1, the best possible score.
        inputs = torch.tensor([*row[:-1][-5:], NUM_ITEMS + 1])
        best = model(weight[inputs], torch.tensor([0, len(inputs)]), len(inputs))[-1]
        unit[0] = unit[NUM_ITEMS + 1] = best
        out = task.eval_batch(make_batch([row]), _EvalState(weight, unit, 0, model), top_k=NUM_ITEMS)
        top = out.top_ids[0]
        listed = top[top > 0]
        assert int(listed.max()) <= NUM_ITEMS and len(set(listed.tolist())) == len(listed)
        history = set(row[-7:-1]) - {row[-1]}
        assert len(listed) == NUM_ITEMS - len(history) and not set(listed.tolist()) & history
        assert bool((top[len(listed) :] == 0).all())  # zeros only pad the end
        s, t = scores[b], row[-1]
        want = sum(1 for i in range(1, NUM_ITEMS + 1) if i != t and i not in history and s[i] >= s[t])
        assert int(out.ranks[0]) == want
        assert int((listed == t).nonzero()[0, 0]) == want  # the list reproduces the rank


def test_the_logged_model_recommends_what_the_evaluation_ranks(tmp_path):
    """train/serving.py, saved and loaded back by MLflow as ``tracking.log_model`` logs it (a pyfunc
    from code, the same artifacts), recommends for BERT4Rec the evaluation's top list: the query at a
    mask appended after the history, the history's last max_seq_len items excluded, never the mask
    or padding row. The control: the query at the last history position ranks differently."""
    import mlflow
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cluster.config import save_config
    from tests.conftest import ROOT
    from train.tracking import recommender_signature

    task = make_task()
    model, weight = model_and_table(task)
    save_config(task.cfg, tmp_path / "config.yaml")
    torch.save(model.state_dict(), tmp_path / "encoder.pt")
    np.save(tmp_path / "item_table.npy", weight.numpy())  # rows 0..31: padding, items, the mask
    raw = {d: f"sku-{d * 7}" for d in range(1, NUM_ITEMS + 1)}
    pq.write_table(
        pa.table({"raw_id": list(raw.values()), "dense_id": list(raw)}), tmp_path / "items.parquet"
    )
    artifacts = {name: str(tmp_path / file) for name, file in
                 [("config", "config.yaml"), ("encoder", "encoder.pt"), ("item_table", "item_table.npy"),
                  ("items", "items.parquet")]}  # fmt: skip
    mlflow.pyfunc.save_model(tmp_path / "model", python_model=str(ROOT / "train" / "serving.py"), artifacts=artifacts,
                             signature=recommender_signature())  # fmt: skip
    served = mlflow.pyfunc.load_model(str(tmp_path / "model"))

    rows = [r for r in ROWS if len(r) >= 2]
    out = task.eval_batch(make_batch(rows), eval_state(task, model, weight), top_k=12)
    expected = [[raw[i] for i in top.tolist() if i > 0] for top in out.top_ids]
    histories = pd.DataFrame({"history": [[raw[i] for i in r[:-1]] for r in rows]})
    got = served.predict(histories, params={"k": 12})["top_item_ids"].tolist()
    assert [list(g) for g in got] == expected
    # The control: scoring the last history position (the next-item models' query) gives other lists.
    unit = F.normalize(weight, dim=-1)
    last_position = []
    for r in rows:
        inputs = torch.tensor(r[:-1][-6:])
        query = model(weight[inputs], torch.tensor([0, len(inputs)]), len(inputs))[-1]
        scores = query @ unit[: NUM_ITEMS + 1].T
        scores[0] = -torch.inf
        scores[inputs] = -torch.inf
        last_position.append([raw[int(i)] for i in scores.topk(12).indices])
    assert last_position != expected


# ------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1"])
def test_mask_prob_outside_0_1_is_one_clear_error(value):
    with pytest.raises(ConfigError, match=r"model.mask_prob.*\(0, 1\)") as err:
        load_train_config(None, ["model.name=bert4rec", f"model.mask_prob={value}"])
    assert "\n" not in str(err.value)


def test_bad_settings_from_the_command_line_are_one_clear_line(synthetic_data, tmp_path):
    bad = run_train([f"data.dir={synthetic_data}", "model.name=bert4rec", "model.mask_prob=1.2"], tmp_path / "a",
                    check=False)  # fmt: skip
    assert bad.returncode == 2 and "model.mask_prob" in bad.stderr and "Traceback" not in bad.stderr
    # An option only another family understands (GRU4Rec's hidden size; BERT4Rec's mask on SASRec).
    other = run_train([f"data.dir={synthetic_data}", "model.name=bert4rec", "model.hidden_size=8"], tmp_path / "b",
                      check=False)  # fmt: skip
    assert other.returncode == 2 and "model.hidden_size" in other.stderr and "Traceback" not in other.stderr
    with pytest.raises(ConfigError, match="model.mask_prob"):
        load_train_config(None, ["model.name=sasrec", "model.mask_prob=0.2"])


def test_model_is_bidirectional():
    """An early position's output depends on later items (unlike SASRec's causal mask)."""
    task = make_task()
    model, weight = model_and_table(task)
    assert isinstance(model, Bert4Rec)
    ids = torch.tensor([1, 2, 3, 4])
    changed = torch.tensor([1, 2, 3, 5])
    a = model(weight[ids], torch.tensor([0, 4]), 4)[0]
    b = model(weight[changed], torch.tensor([0, 4]), 4)[0]
    assert not torch.allclose(a, b)


# ------------------------------------------------------------------------- activation checkpointing


def test_checkpointed_blocks_give_the_same_outputs_and_gradients_with_dropout():
    """``checkpoint_layers`` wraps BERT4Rec's blocks: in train mode with dropout and attention dropout
    (CPU's math kernel), the recomputed blocks draw the same masks (checkpoint restores the RNG
    state), so outputs and parameter gradients equal an unwrapped copy's on rows of different lengths.
    The blocks are really recomputed: their Q|K|V projection runs twice per step."""
    import copy

    from cluster.memory_measure import checkpoint_layers
    from train.models.config import ModelConfig

    cfg = ModelConfig(name="bert4rec", embedding_dim=16, num_blocks=3, num_heads=2, ffn_dim=32, dropout=0.3,
                      attn_dropout=0.3, max_seq_len=12)  # fmt: skip
    torch.manual_seed(0)
    plain = Bert4Rec(cfg).train()
    wrapped = copy.deepcopy(plain)
    checkpoint_layers(wrapped)
    lengths = [12, 5, 9, 1, 7]
    offsets = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    item_emb = torch.randn(sum(lengths), 16)
    weights = torch.randn(sum(lengths), 16)
    qkv_calls = []
    wrapped.blocks[0].qkv.register_forward_hook(lambda *_: qkv_calls.append(1))

    def step(model):
        torch.manual_seed(123)  # the same dropout draws for both models
        x = item_emb.clone().requires_grad_(True)
        out = model(x, offsets, max(lengths))
        (out * weights).sum().backward()
        return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}

    out_plain, input_grad_plain, grads_plain = step(plain)
    out_ckpt, input_grad_ckpt, grads_ckpt = step(wrapped)
    assert len(qkv_calls) == 2  # forward, then the recomputation in backward
    torch.testing.assert_close(out_ckpt, out_plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(input_grad_ckpt, input_grad_plain, rtol=1e-6, atol=1e-7)
    assert grads_ckpt.keys() == grads_plain.keys()
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    # Dropout is really on: another seed gives another output.
    torch.manual_seed(7)
    assert not torch.allclose(plain(item_emb, offsets, max(lengths)), out_plain)


def test_checkpointing_lowers_the_measured_peak_activations():
    """One real step of a 6-block BERT4Rec under MemTracker (``measure_dense_step``): checkpointing
    keeps each block's input instead of everything the block saves, so the peak activations drop
    (measured: to a quarter of them here)."""
    from cluster.memory import ModelDims
    from cluster.memory_measure import measure_dense_step

    dims = ModelDims("bert4rec", 32, 6, 2, 32, 128, 128)
    lengths = [100, 80, 60, 40] * 4
    positions = list(range(0, sum(lengths), 5))  # the loss at the masked positions
    full = measure_dense_step(dims, lengths, num_negatives=16, num_items=500, loss_positions=positions)
    ckpt = measure_dense_step(dims, lengths, num_negatives=16, num_items=500, loss_positions=positions,
                              checkpointing=True)  # fmt: skip
    assert ckpt.activations < 0.4 * full.activations, (ckpt, full)
    assert ckpt.params == full.params and ckpt.optimizer == full.optimizer
