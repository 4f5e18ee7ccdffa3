"""Measure one real training step's memory by term, to validate ``cluster/memory.py``.

``measure_dense_step`` runs the real encoder (``train.models.build_encoder``; BERT4Rec's
``train.models.bert4rec.Bert4Rec``), the real loss
(``train/models/losses.py``) and AdamW for one forward/backward/step under PyTorch's
``MemTracker`` (``torch.distributed._tools.mem_tracker``), which attributes every live tensor to
parameters, gradients, optimizer state or activations and records the peak. With ``fake=True`` the
step runs under ``FakeTensorMode``: tensors have shapes and dtypes but no storage, so H100-sized
steps (tens of GiB) are "measured" on a laptop. The item table is replaced by a leaf tensor holding
the step's looked-up rows (the sharded table is measured separately, with TorchRec).

On CUDA, ``torch.cuda.max_memory_allocated`` is reported next to the tracker's peak.
"""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass

import torch

from cluster.memory import ModelDims


@dataclass
class MeasuredStep:
    """Peak bytes by MemTracker category, and the tracker's peak total."""

    params: int
    grads: int
    optimizer: int
    activations: int  # activations + temporaries (backward's gradients of activations)
    other: int  # the looked-up embedding rows (tracked as external inputs) and their grads
    total: int
    cuda_peak: int | None = None


def _build_encoder(dims: ModelDims) -> torch.nn.Module:
    """The real encoder ``dims`` describes (HSTU, SASRec, GRU4Rec or BERT4Rec)."""
    from train.models import build_encoder
    from train.models.bert4rec import Bert4Rec
    from train.models.config import ModelConfig

    if dims.name == "gru4rec":  # a GRU: num_blocks layers of linear_dim (hidden_size)
        return build_encoder(
            ModelConfig(
                name="gru4rec", embedding_dim=dims.embedding_dim, hidden_size=dims.linear_dim,
                num_layers=dims.num_blocks, dropout=dims.dropout, hidden_dropout=dims.hidden_dropout,
                max_seq_len=dims.max_seq_len,
            )
        )  # fmt: skip
    shared = dict(
        embedding_dim=dims.embedding_dim, num_blocks=dims.num_blocks, num_heads=dims.num_heads,
        dropout=dims.dropout, attn_dropout=dims.attn_dropout, max_seq_len=dims.max_seq_len,
    )  # fmt: skip
    if dims.name == "bert4rec":  # not a next-item encoder: its task builds it directly
        return Bert4Rec(ModelConfig(name="bert4rec", ffn_dim=dims.linear_dim, **shared))
    if dims.name == "sasrec":
        return build_encoder(ModelConfig(name="sasrec", ffn_dim=dims.linear_dim, **shared))
    return build_encoder(
        ModelConfig(
            name="hstu", attention_dim=dims.attention_dim, linear_dim=dims.linear_dim,
            use_position_bias=dims.use_position_bias, use_time_bias=dims.use_time_bias, **shared,
        )
    )  # fmt: skip


def checkpoint_layers(encoder: torch.nn.Module) -> None:
    """Wrap every layer of ``encoder`` in ``torch.utils.checkpoint`` (non-reentrant).

    Activation checkpointing for the schedule's ``checkpointing=True``, without touching the
    model code: each layer then keeps only its inputs for backward and recomputes the rest. The
    layers are ``encoder.layers`` (HSTU) or ``encoder.blocks`` (SASRec, BERT4Rec). What is wrapped is
    the method the encoder calls per layer: ``forward_jagged`` where the layer has one (HSTU, SASRec:
    their jagged path; the padded reference path stays unwrapped), else ``forward`` (BERT4Rec's
    blocks, called as ``block(x_BND, keys_B11N)`` on the padded batch). ``checkpoint`` saves and
    restores the RNG state (its default ``preserve_rng_state=True``), so dropout inside a recomputed
    layer draws the same mask as in the forward pass.
    """
    from torch.utils.checkpoint import checkpoint

    layers = getattr(encoder, "layers", None) or getattr(encoder, "blocks", None)
    if layers is None:
        raise ValueError(f"{type(encoder).__name__}: no .layers or .blocks to checkpoint")
    for layer in layers:
        name = "forward_jagged" if hasattr(layer, "forward_jagged") else "forward"
        inner = getattr(layer, name)

        def wrapped(*args, _inner=inner):
            return checkpoint(_inner, *args, use_reentrant=False)

        setattr(layer, name, wrapped)


@contextlib.contextmanager
def _host_lengths(lengths: list[int], fake: bool):
    """Under FakeTensorMode, give HSTU's jagged path the batch's lengths as a real host tensor.

    HSTU reads the lengths on the host (``.tolist()``) to plan its length groups; a fake tensor has
    no values, so the lengths the caller knows are handed in instead (same values, same plan).
    """
    if not fake:
        yield
        return
    import train.models.hstu as hstu

    original = hstu.seq_lengths
    real = torch.tensor(lengths, dtype=torch.int64)
    hstu.seq_lengths = lambda offsets: real
    try:
        yield
    finally:
        hstu.seq_lengths = original


def measure_dense_step(
    dims: ModelDims,
    lengths: list[int],
    *,
    negatives: str = "shared",
    num_negatives: int = 128,
    num_items: int = 1000,
    dtype: torch.dtype = torch.float32,
    checkpointing: bool = False,
    fake: bool = False,
    device: str = "cpu",
    seed: int = 0,
    loss_positions: list[int] | None = None,
) -> MeasuredStep:
    """One forward/backward/AdamW step of the real encoder + loss on a batch of ``lengths``.

    ``loss_positions``: the jagged positions the loss is taken at (BERT4Rec's masked items, as its
    task indexes them out of the encoder's output); default every position (next-item retrieval).
    The looked-up rows then hold inputs, one target per loss position and the negatives.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from train.models.losses import full_softmax_loss, in_batch_softmax_loss, sampled_softmax_loss

    torch.manual_seed(seed)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with _host_lengths(lengths, fake), mode:
        dev = torch.device(device)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # build in the step's dtype (.to() cannot swap fake parameters)
        try:
            encoder = _build_encoder(dims)
        finally:
            torch.set_default_dtype(previous)
        if dev.type != "cpu":
            encoder = encoder.to(dev)
        if checkpointing:
            checkpoint_layers(encoder)
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=1e-3, foreach=False)
        num_tokens = sum(lengths)
        positions = list(range(num_tokens)) if loss_positions is None else list(loss_positions)
        num_targets = len(positions)
        offsets = torch.tensor([0, *itertools.accumulate(lengths)], device=dev)
        max_len = max(lengths)
        d = dims.embedding_dim
        # The lookup's output: what the sharded table hands the dense side (inputs, targets, negatives).
        num_neg_rows = {"shared": num_negatives, "per_position": num_targets * num_negatives,
                        "full": num_items, "in_batch": 0}[negatives]  # fmt: skip
        rows = torch.randn(num_tokens + num_targets + num_neg_rows, d, device=dev, requires_grad=True)
        targets = torch.randint(1, num_items + 1, (num_targets,), device=dev)
        selected = None
        if loss_positions is not None:
            selected = torch.zeros(num_tokens, dtype=torch.bool, device=dev)
            selected[torch.tensor(positions, dtype=torch.long, device=dev)] = True

        def step() -> None:
            seq = rows[:num_tokens].to(dtype)
            tgt = rows[num_tokens : num_tokens + num_targets]
            neg = rows[num_tokens + num_targets :]
            query = encoder(seq, offsets, max_len)
            if selected is not None:  # BERT4Rec's task: the loss sees the masked positions only
                query = query[selected]
            query = query.float()
            if negatives == "in_batch":
                loss, _ = in_batch_softmax_loss(query, tgt, targets, 0.05)
            elif negatives == "full":
                loss, _ = full_softmax_loss(query, neg, targets, 0.05)
            else:
                if negatives == "per_position":
                    neg = neg.view(num_targets, num_negatives, d)
                    neg_ids = torch.randint(1, num_items + 1, (num_targets, num_negatives), device=dev)
                else:
                    neg_ids = torch.randint(1, num_items + 1, (num_negatives,), device=dev)
                loss, _ = sampled_softmax_loss(query, tgt, targets, neg, neg_ids, 0.05)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.grad = None

        step()  # warm-up: the optimizer's state exists from the second step on, as in training
        tracker = MemTracker()
        tracker.track_external(encoder, optimizer, rows)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")
    snap = next((v for k, v in peak.items() if torch.device(k).type == dev.type), {})
    get = lambda key: int(snap.get(key, 0))  # noqa: E731
    cuda_peak = torch.cuda.max_memory_allocated() if (dev.type == "cuda" and not fake) else None
    return MeasuredStep(
        params=get("Parameter") + get("Buffer"),
        grads=get("Gradient"),
        optimizer=get("Optstate"),
        activations=get("Activation") + get("Temp"),
        other=get("Other"),
        total=get("Total"),
        cuda_peak=cuda_peak,
    )


def measure_tiger_step(
    cfg,
    codebook_sizes: list[int],
    num_examples: int,
    encoder_len: int,
    *,
    dtype: torch.dtype = torch.float32,
    fake: bool = False,
    seed: int = 0,
) -> MeasuredStep:
    """One forward/backward/AdamW step of TIGER's encoder-decoder (``train.models.tiger.Tiger``)
    and its cross-entropy on ``num_examples`` examples of ``encoder_len`` encoder tokens (all real)
    and L decoder tokens, under MemTracker (see ``measure_dense_step``). The embedded tokens are one
    fp32 leaf ``[E (S + L), D]`` standing for the token table's lookup output."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from train.models.tiger import Tiger

    torch.manual_seed(seed)
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = Tiger(cfg, codebook_sizes)
        finally:
            torch.set_default_dtype(previous)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=False)
        e, s, levels, d = num_examples, encoder_len, len(codebook_sizes), cfg.d_model
        rows = torch.randn(e * (s + levels), d, requires_grad=True)
        enc_mask = torch.ones(e, s, dtype=torch.bool)
        targets = torch.randint(0, min(codebook_sizes), (e, levels))

        def step() -> None:
            emb = rows.to(dtype)
            enc = emb[: e * s].view(e, s, d)
            dec = emb[e * s :].view(e, levels, d)
            logits = model(enc, enc_mask, dec).float()
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            rows.grad = None

        step()
        tracker = MemTracker()
        tracker.track_external(model, optimizer, rows)
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")
    snap = next((v for k, v in peak.items() if torch.device(k).type == "cpu"), {})
    get = lambda key: int(snap.get(key, 0))  # noqa: E731
    return MeasuredStep(
        params=get("Parameter") + get("Buffer"),
        grads=get("Gradient"),
        optimizer=get("Optstate"),
        activations=get("Activation") + get("Temp"),
        other=get("Other"),
        total=get("Total"),
    )
