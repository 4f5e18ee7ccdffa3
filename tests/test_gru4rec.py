"""GRU4Rec encoder against an independent step-by-step recurrence, and its config errors.

The trainer-level checks (2 processes == 1, killed-and-resumed == uninterrupted) are the family's
parametrisations of tests/test_trainer.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cluster.config import ConfigError
from train.config import load_train_config
from train.models import GRU4Rec, build_encoder
from train.models.config import ModelConfig


def reference_gru4rec(model: GRU4Rec, item_emb: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """One sequence at a time, one step at a time, with the GRU equations written out (torch's gate
    order r, z, n in ``weight_ih_l{k}``), then the projection and the L2 normalisation."""
    gru, hidden = model.gru, model.cfg.hidden_size
    outputs = []
    for b in range(len(offsets) - 1):
        states = [torch.zeros(hidden, dtype=item_emb.dtype) for _ in range(gru.num_layers)]
        for t in range(int(offsets[b]), int(offsets[b + 1])):
            x = item_emb[t]
            for k in range(gru.num_layers):
                w_ih, w_hh = getattr(gru, f"weight_ih_l{k}"), getattr(gru, f"weight_hh_l{k}")
                b_ih, b_hh = getattr(gru, f"bias_ih_l{k}"), getattr(gru, f"bias_hh_l{k}")
                gi, gh = w_ih @ x + b_ih, w_hh @ states[k] + b_hh
                r = torch.sigmoid(gi[:hidden] + gh[:hidden])
                z = torch.sigmoid(gi[hidden : 2 * hidden] + gh[hidden : 2 * hidden])
                n = torch.tanh(gi[2 * hidden :] + r * gh[2 * hidden :])
                states[k] = (1 - z) * n + z * states[k]
                x = states[k]
            q = model.output.weight @ x + model.output.bias
            outputs.append(q / q.norm().clamp_min(1e-6))
    return torch.stack(outputs)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_matches_a_step_by_step_recurrence_with_padding_and_variable_lengths(num_layers):
    cfg = ModelConfig(name="gru4rec", embedding_dim=6, hidden_size=5, num_layers=num_layers, dropout=0.3,
                      hidden_dropout=0.3, max_seq_len=9)  # fmt: skip
    torch.manual_seed(0)
    model = build_encoder(cfg).double().eval()  # eval: dropout off, as the reference has none
    lengths = torch.tensor([1, 7, 3, 9, 2])  # the batch pads every row to 9
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    item_emb = torch.randn(int(offsets[-1]), 6, dtype=torch.float64)
    got = model(item_emb, offsets, int(lengths.max()))
    torch.testing.assert_close(got, reference_gru4rec(model, item_emb, offsets), rtol=1e-10, atol=1e-10)
    # The same sequences in a batch padded further (max_seq_len argument 9 vs. each one alone).
    for b in range(len(lengths)):
        one = item_emb[offsets[b] : offsets[b + 1]]
        alone = model(one, torch.tensor([0, len(one)]), len(one))
        torch.testing.assert_close(alone, got[offsets[b] : offsets[b + 1]], rtol=1e-12, atol=1e-12)


def test_dropout_is_on_the_input_embeddings_in_training():
    cfg = ModelConfig(name="gru4rec", embedding_dim=6, hidden_size=5, dropout=0.5, max_seq_len=4)
    model = build_encoder(cfg).train()
    item_emb, offsets = torch.randn(4, 6), torch.tensor([0, 4])
    torch.manual_seed(1)
    a = model(item_emb, offsets, 4)
    torch.manual_seed(1)
    b = model(item_emb, offsets, 4)
    torch.manual_seed(1)
    kept = F.dropout(item_emb, 0.5, training=True)  # the draw the model's input dropout makes first
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, model.eval()(kept, offsets, 4), rtol=1e-6, atol=1e-6)


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_train_config(None, ["model.name=gru4rec", "model.hidden_size=0"])
    with pytest.raises(ConfigError, match="model.hidden_dropout"):
        load_train_config(None, ["model.name=gru4rec", "model.hidden_dropout=1.0"])
    # A key that only the transformer families understand.
    with pytest.raises(ConfigError, match="model.num_heads") as err:
        load_train_config(None, ["model.name=gru4rec", "model.num_heads=2"])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.hidden_size"):
        load_train_config(None, ["model.name=sasrec", "model.hidden_size=64"])
