"""Per-rank GPU memory model of one training step: every term separately, in bytes.

    family = family_memory(cfg)                              # the model family's terms, from its task
    batch = family.batch_from_lengths(lengths)               # or family.batch_bound(tokens)
    est = estimate_memory(cfg, world_size=8, local_world_size=8, num_items=10**8, batch=batch)
    est.terms["embedding_optimizer"], est.total, est.with_margin

Model families. The terms that depend on the family (its table's shape, dense parameters, and
the per-step ``lookup``, ``activations``, ``attention``, ``loss``, ``recompute``) come from a
``FamilyMemory`` its task returns (``Task.memory_model(cfg)``, chosen by ``model.name`` in the task
registry ``train/tasks/__init__.py``): ``RetrievalMemory`` here for HSTU, SASRec and GRU4Rec
(below), ``Bert4RecMemory`` in ``train/tasks/bert4rec.py`` (the mask row, a loss over the masked
positions) and ``TigerMemory`` in ``train/tasks/tiger.py``. The table, ZeRO and margin terms are
shared. Activation checkpointing applies to HSTU, SASRec and BERT4Rec (not GRU4Rec, TIGER).

Terms (all per rank, the worst rank where ranks differ; the per-step ones as the retrieval task has
them, see ``TigerMemory`` for TIGER's):

``embedding_weights`` / ``embedding_optimizer`` / ``embedding_grads``
    The item table's shard and its fused optimizer state under ``embeddings.sharding_type``. The
    shard shapes come from TorchRec's own ``calculate_shard_sizes_and_offsets`` (row_wise: the first
    ranks hold ``ceil(rows / world)`` rows; table_row_wise: ``ceil(rows / local_world)``; table_wise:
    the whole table on one rank; column_wise: blocks of ``min_partition`` (TorchRec's default 128,
    or the whole width when it does not divide) spread over the ranks; data_parallel: the whole
    table everywhere). fbgemm stores widths as multiples of 4 (``train/embeddings.py``), so the stored
    width, not ``embedding_dim``, is used. Optimizer state in fp32: rowwise_adagrad one value per row
    *and column shard*, adagrad the table's shape, sgd nothing, adam two tables. Fused kernels
    (model parallel) keep no gradient; data_parallel keeps a dense gradient the table's size
    (TorchRec's DDP), which is ``embedding_grads``.
    Where this differs from TorchRec's planner (``EmbeddingStorageEstimator`` /
    ``calculate_shard_storages``): the planner charges rowwise_adagrad ``tensor_bytes / width``
    per shard, i.e. one value per row scaled by the shard's share of the columns, so under
    column_wise sharding it undercounts (fbgemm keeps a full row of state per column shard); it
    charges adagrad/other optimizers 1x and never charges data_parallel's dense gradient; and on
    GPU it adds input/output buffers of the lookup, which we count in ``lookup`` from the actual
    step (unique ids, not the planner's pooling-factor guess).
``lookup``
    The step's embedding rows: the unique ids' lookup output plus the per-position copies the
    trainer indexes from it (inputs, targets and negatives, fp32) and their gradients in backward.
``dense_params`` / ``dense_grads`` / ``dense_optimizer``
    The encoder under DeepSpeed ZeRO with AdamW. P parameters, N data-parallel ranks, w = 2 bytes
    (bf16/fp16) or 4 (fp32) for the model copy:
      stage 0: params wP, grads wP, optimizer 8P (+ fp32 master 4P with mixed precision);
      stage 1: optimizer states and the fp32 master copy partitioned: (8P + 4P) / N;
      stage 2: also the gradients: grads wP / N;
      stage 3: also the parameters: params wP / N, plus the gathered working set of the two
               largest layers (prefetch);
    DeepSpeed stages 1-2 keep an fp32 partition copy even for fp32 models (``single_partition_of_
    fp32_groups``), so the master term applies for every precision at stages >= 1.
    ``offload_optimizer`` moves master weights and optimizer states (and the fp32 gradient
    partition) to CPU; ``offload_params`` (stage 3) moves the parameters, leaving the working set.
``activations`` / ``attention``
    What the encoder keeps for backward, from a per-family function of the batch's jagged lengths
    (``ACTIVATION_MODELS[name](dims, batch, dtype_bytes, dropout, checkpointing)``): the linear
    part (per token) in ``activations``, the part quadratic in the lengths in ``attention``.
``loss``
    Buffers of the loss over N positions: negatives x positions (x width for per_position).
``backward`` (GRU4Rec, BERT4Rec without checkpointing)
    Backward's extra at its peak beyond what the forward keeps (gradients of the output stage and,
    for GRU4Rec, of the padded states), charged as its excess over ``loss``: the loss buffers are
    freed before it appears.
``recompute`` (activation checkpointing only)
    The working set of the layer backward is recomputing, plus the gradient flowing into it and the
    target and negative rows' gradients (one target per loss position: BERT4Rec's masked ones),
    beyond the loss buffers and the normalised output: those are freed before any layer is
    recomputed, so the peak is the larger of the two, and this term is the excess.
``margin``
    Allocator fragmentation and what ``max_memory_allocated`` does not see (CUDA context, NCCL
    buffers): ``MARGIN_FRACTION`` of the sum plus ``MARGIN_FIXED_BYTES``.

Everything here is pure arithmetic (no tensors), so the planner can call it thousands of times.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

GiB = 1024**3
MiB = 1024**2

# Allocator margin: fragmentation of the caching allocator (measured peaks of reserved vs allocated
# memory are typically 5-10% apart) plus a fixed amount for the CUDA context and NCCL buffers,
# which max_memory_allocated does not count but the GPU does.
MARGIN_FRACTION = 0.08
MARGIN_FIXED_BYTES = int(1.0 * GiB)

# fbgemm's storage alignment of embedding rows (train/embeddings.py rounds widths up to it).
FBGEMM_WIDTH_ALIGN = 4
# TorchRec's default column-wise block width (torchrec.distributed.planner.constants.MIN_CW_DIM).
TORCHREC_MIN_CW_DIM = 128

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# DeepSpeed's default reduce_bucket_size (elements); train/zero.py does not set it.
DEEPSPEED_REDUCE_BUCKET = int(5e8)
SHARDING_TYPES = ("row_wise", "table_wise", "column_wise", "table_row_wise", "data_parallel")
TABLE_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd", "adam")

# HSTU's jagged path pads each length group to its longest row (train/models/hstu.py,
# plan_length_groups with shrink 0.75): padding adds at most 1/0.75 to tokens, 1/0.75^2 to l^2.
# Without the real lengths (planning from budgets) the planner assumes this typical overhead.
HSTU_PAD_TOKENS = 1.10
HSTU_PAD_SQUARES = 1.25


# ----------------------------------------------------------------------------------- the adapter


@dataclass(frozen=True)
class ModelDims:
    """The encoder's shape as the memory model needs it, independent of how the config spells it."""

    name: str
    embedding_dim: int
    num_blocks: int
    num_heads: int
    attention_dim: int
    linear_dim: int
    max_seq_len: int
    dropout: float = 0.0
    attn_dropout: float = 0.0
    use_position_bias: bool = True
    use_time_bias: bool = False
    num_time_buckets: int = 128
    hidden_dropout: float = 0.0  # GRU4Rec: dropout between GRU layers

    # GRU4Rec spells its shape differently: num_blocks = num_layers (GRU layers), linear_dim =
    # hidden_size (the GRU state's width); it has no heads, attention or position table.
    # BERT4Rec: linear_dim = ffn_dim, as for SASRec.

    def position_params(self) -> int:
        """The learned position table (none in GRU4Rec)."""
        return 0 if self.name == "gru4rec" else self.max_seq_len * self.embedding_dim

    def layer_params(self) -> list[int]:
        """Parameters of each block / layer, in order (ZeRO-3 gathers a layer at a time)."""
        d, h, lin = self.embedding_dim, self.num_heads, self.linear_dim
        if self.name == "hstu":
            e, f = h * self.attention_dim, h * lin
            per_layer = d * (2 * f + 2 * e) + f * d + d
            per_layer += (
                self.max_seq_len * self.use_position_bias + self.num_time_buckets * self.use_time_bias
            )
            return [per_layer] * self.num_blocks
        if self.name == "sasrec":  # query, key|value, output, FFN; norms without parameters
            per_layer = (d * d + d) + (d * 2 * d + 2 * d) + (d * d + d) + (d * lin + lin) + (lin * d + d)
            return [per_layer] * self.num_blocks
        if self.name == "bert4rec":  # qkv, output, FFN, two affine LayerNorms
            per_layer = (d * 3 * d + 3 * d) + (d * d + d) + (d * lin + lin) + (lin * d + d) + 2 * 2 * d
            return [per_layer] * self.num_blocks
        if self.name == "gru4rec":  # torch.nn.GRU: W_ih [3H, in], W_hh [3H, H], two biases [3H]
            return [
                3 * lin * (d if i == 0 else lin) + 3 * lin * lin + 2 * 3 * lin for i in range(self.num_blocks)
            ]
        raise ValueError(
            f"model.name={self.name!r}: no parameter count; known: hstu, sasrec, gru4rec, bert4rec"
        )

    def head_params(self) -> int:
        """Parameters outside the position table and the layers."""
        d = self.embedding_dim
        if self.name == "gru4rec":  # the output projection H -> D
            return self.linear_dim * d + d
        if self.name == "bert4rec":  # the input LayerNorm; the head's Linear D -> D and LayerNorm
            return 2 * d + (d * d + d) + 2 * d
        return 0

    def num_params(self) -> int:
        """Dense parameters of the encoder (position table, layers, head), from the modules' shapes."""
        return self.position_params() + sum(self.layer_params()) + self.head_params()

    def largest_layer_params(self) -> int:
        """Parameters of the largest layer (ZeRO-3 gathers a layer at a time)."""
        return max([*self.layer_params(), self.head_params()])


def model_dims(cfg) -> ModelDims:
    """``TrainConfig`` -> ``ModelDims``. The only function that reads ``cfg.model``.

    ``cfg.model`` is the family's own dataclass (``HSTUConfig``, ``SASRecConfig``, ``GRU4RecConfig``
    or ``Bert4RecConfig``; SASRec's and BERT4Rec's feed-forward width ``ffn_dim`` plays the role of
    ``linear_dim``, GRU4Rec's ``num_layers`` and ``hidden_size`` those of ``num_blocks`` and
    ``linear_dim``). TIGER brings its own ``FamilyMemory`` (``family_memory``).
    """
    m = cfg.model
    if m.name not in ACTIVATION_MODELS:
        raise ValueError(
            f"model_dims covers the retrieval encoders ({', '.join(ACTIVATION_MODELS)}), not {m.name}"
        )
    if m.name == "gru4rec":  # layers of hidden_size; no heads, attention or positions
        return ModelDims(
            name=m.name, embedding_dim=m.embedding_dim, num_blocks=m.num_layers, num_heads=1,
            attention_dim=0, linear_dim=m.hidden_size, max_seq_len=m.max_seq_len, dropout=m.dropout,
            hidden_dropout=m.hidden_dropout, use_position_bias=False,
        )  # fmt: skip
    section = m
    return ModelDims(
        name=m.name,
        embedding_dim=section.embedding_dim,
        num_blocks=section.num_blocks,
        num_heads=section.num_heads,
        attention_dim=getattr(section, "attention_dim", section.embedding_dim),
        linear_dim=section.linear_dim if m.name == "hstu" else section.ffn_dim,  # SASRec, BERT4Rec
        max_seq_len=section.max_seq_len,
        dropout=getattr(section, "dropout", 0.0),
        attn_dropout=getattr(section, "attn_dropout", 0.0),
        use_position_bias=getattr(section, "use_position_bias", False),
        use_time_bias=getattr(section, "use_time_bias", False),
        num_time_buckets=getattr(section, "num_time_buckets", 0),
    )


# ------------------------------------------------------------------------------------ the batch


@dataclass(frozen=True)
class BatchShape:
    """One rank's batch of model inputs as the memory model sees it.

    ``num_tokens`` = sum l, ``sum_squares`` = sum l^2 (the attention cost). ``padded_tokens`` and
    ``padded_squares`` are what the encoder really pads to: for HSTU sum over length groups of
    B_g N_g and B_g N_g^2; for SASRec (its attention), GRU4Rec (its GRU) and BERT4Rec (every block)
    B N and B N^2 (the batch's longest row).
    """

    num_rows: int
    num_tokens: int
    sum_squares: int
    max_len: int
    padded_tokens: int
    padded_squares: int
    group_squares: int = 0  # sum over length groups of N_g^2 (HSTU's per-group masks)

    @staticmethod
    def from_lengths(lengths, family: str) -> BatchShape:
        """Exact shape of a batch with model-input lengths ``lengths`` for model ``family``."""
        ls = [int(x) for x in lengths]
        if family == "hstu":
            from train.models.hstu import HSTU, plan_length_groups

            ordered = sorted(ls, reverse=True)
            groups = plan_length_groups(ordered, HSTU.length_group_shrink, HSTU.length_group_min_size)
            pad_t = sum((end - start) * ordered[start] for start, end in groups)
            pad_s = sum((end - start) * ordered[start] ** 2 for start, end in groups)
            group_sq = sum(ordered[start] ** 2 for start, _ in groups)
        else:
            n = max(ls, default=0)
            pad_t, pad_s, group_sq = len(ls) * n, len(ls) * n * n, n * n
        return BatchShape(
            len(ls), sum(ls), sum(x * x for x in ls), max(ls, default=0), pad_t, pad_s, group_sq
        )

    @staticmethod
    def bound(num_tokens: int, max_len: int, family: str, sum_squares: int | None = None) -> BatchShape:
        """Worst case under a token budget: rows as long as ``max_len`` (sum l^2 <= max_len * sum l).

        Used by the planner, which knows the budgets, not the batches. ``sum_squares`` caps l^2
        when an attention-cost budget is also set.
        """
        sq = num_tokens * max_len if sum_squares is None else min(sum_squares, num_tokens * max_len)
        rows = max(1, -(-num_tokens // max(1, max_len)))
        if family == "hstu":
            pad_t, pad_s = int(num_tokens * HSTU_PAD_TOKENS), int(sq * HSTU_PAD_SQUARES)
            group_sq = 4 * max_len * max_len  # a few groups; the longest dominates
        else:  # SASRec, GRU4Rec, BERT4Rec pad every row to the batch's longest
            pad_t, pad_s, group_sq = rows * max_len, rows * max_len * max_len, max_len * max_len
        return BatchShape(rows, num_tokens, sq, max_len, pad_t, pad_s, group_sq)


# ------------------------------------------------------------------------------ embedding terms


def stored_width(embedding_dim: int) -> int:
    """The width fbgemm stores: ``embedding_dim`` rounded up to a multiple of 4."""
    return -(-embedding_dim // FBGEMM_WIDTH_ALIGN) * FBGEMM_WIDTH_ALIGN


def column_block(width: int, min_partition: int | None) -> int:
    """Column-wise shard width, as TorchRec computes it (``_get_block_size_for_cw_shard``)."""
    from torchrec.distributed.sharding_plan import _get_block_size_for_cw_shard

    return _get_block_size_for_cw_shard(width, min_partition)


def table_shards_on_worst_rank(
    num_rows: int,
    width: int,
    sharding_type: str,
    world_size: int,
    local_world_size: int,
    min_partition: int | None = None,
) -> list[tuple[int, int]]:
    """(rows, columns) of every shard the most loaded rank holds.

    Shard shapes come from TorchRec (``calculate_shard_sizes_and_offsets``); placement is the
    planner's greedy balance, so the most loaded rank gets ``ceil(num_shards / world)`` shards of
    the largest size (row_wise shards: the first, ceil-sized ones).
    """
    if sharding_type not in SHARDING_TYPES:
        raise ValueError(f"sharding_type={sharding_type!r}: expected one of {', '.join(SHARDING_TYPES)}")
    import torch
    from torchrec.distributed.sharding_plan import calculate_shard_sizes_and_offsets

    meta = torch.empty(num_rows, width, device="meta")
    block = column_block(width, min_partition) if sharding_type == "column_wise" else None
    sizes, _ = calculate_shard_sizes_and_offsets(meta, world_size, local_world_size, sharding_type, block)
    if sharding_type == "data_parallel":
        return [tuple(sizes[0])]
    per_rank = -(-len(sizes) // world_size)
    biggest = sorted((tuple(s) for s in sizes), key=lambda s: s[0] * s[1], reverse=True)
    return biggest[:per_rank]


def embedding_bytes(
    num_rows: int,
    embedding_dim: int,
    sharding_type: str,
    optimizer: str,
    world_size: int,
    local_world_size: int,
    min_partition: int | None = None,
    weight_bytes: int = 4,
) -> dict[str, int]:
    """``embedding_weights``, ``embedding_optimizer``, ``embedding_grads`` of the worst rank."""
    if optimizer not in TABLE_OPTIMIZERS:
        raise ValueError(f"optimizer={optimizer!r}: expected one of {', '.join(TABLE_OPTIMIZERS)}")
    width = stored_width(embedding_dim)
    shards = table_shards_on_worst_rank(
        num_rows, width, sharding_type, world_size, local_world_size, min_partition
    )
    elements = sum(r * c for r, c in shards)
    state_per_element = {"rowwise_adagrad": 0.0, "adagrad": 1.0, "sgd": 0.0, "adam": 2.0}[optimizer]
    opt = int(elements * state_per_element * 4)
    if optimizer == "rowwise_adagrad":
        opt = 4 * sum(r for r, _ in shards)  # one fp32 per row of every shard (per column shard too)
    grads = elements * weight_bytes if sharding_type == "data_parallel" else 0
    return {
        "embedding_weights": elements * weight_bytes,
        "embedding_optimizer": opt,
        "embedding_grads": grads,
    }


def lookup_bytes(
    batch: BatchShape,
    embedding_dim: int,
    negatives: str,
    num_negatives: int,
    num_items: int,
    num_targets: int | None = None,
    table_rows: int | None = None,
) -> int:
    """The step's looked-up rows (fp32) at the forward's end: the unique ids' output and the copies
    the trainer indexes from it for inputs, targets and negatives (train/trainer.py ``train_step``).

    Ids looked up: inputs (T), targets (``num_targets``, default T) and negatives (K shared, K per
    target per position, all I items for full, none in batch); unique ids <= that and <= the table's
    rows (``table_rows``, default I + 1). Their gradients appear in backward,
    after the loss buffers are freed (measured: the peak is at the end of the forward pass or in
    the loss's backward, which ``loss`` covers).
    """
    t = batch.num_tokens
    n = t if num_targets is None else num_targets
    negs = {"shared": num_negatives, "per_position": n * num_negatives, "full": num_items, "in_batch": 0}
    if negatives not in negs:
        raise ValueError(f"loss.negatives={negatives!r}: expected one of {', '.join(negs)}")
    unique = min(t + n + negs[negatives], num_items + 1 if table_rows is None else table_rows)
    return 4 * (unique * stored_width(embedding_dim) + (t + n + negs[negatives]) * embedding_dim)


def pending_rows_grad_bytes(
    batch: BatchShape, embedding_dim: int, negatives: str, num_negatives: int, num_items: int
) -> int:
    """The gradients of the target and negative rows (fp32), alive through the encoder's backward.

    The loss's backward produces them first, but the index (lookup) nodes they flow into were
    created before the encoder's, so autograd runs those last: the gradients wait, at their
    per-position size, until the encoder's backward is done (measured; the unique rows' gradient
    only appears after it). ``batch.num_tokens`` is the number of loss positions, one target each
    (every input position for next-item retrieval, BERT4Rec's masked ones: ``loss_positions``).
    """
    t = batch.num_tokens
    negs = {"shared": num_negatives, "per_position": t * num_negatives, "full": num_items, "in_batch": 0}
    if negatives not in negs:
        raise ValueError(f"loss.negatives={negatives!r}: expected one of {', '.join(negs)}")
    return 4 * (t + negs[negatives]) * embedding_dim


def loss_bytes(
    batch: BatchShape, embedding_dim: int, negatives: str, num_negatives: int, num_items: int
) -> int:
    """Peak buffers of the loss over N = T positions, fp32 (train/models/losses.py, ``LossConfig``).

    Per entry of the [N, C] logits (C = K for shared, N for in_batch, I for full): the logits, the
    masked and concatenated copies (or the cross-entropy's log-softmax), the bool hit mask and, in
    backward, the logits' gradient: 13 bytes measured for shared and in_batch, 12 for full.
    per_position: 8 bytes per [N, K] entry plus three [N, K, D] fp32 tensors at backward's peak (the
    gradients from bmm and from the norms, and their sum).
    """
    n = batch.num_tokens
    if negatives == "shared":
        return 13 * n * num_negatives
    if negatives == "in_batch":
        return 13 * n * n
    if negatives == "full":
        return 12 * n * num_items
    if negatives == "per_position":
        return 8 * n * num_negatives + 12 * n * num_negatives * embedding_dim
    raise ValueError(f"loss.negatives={negatives!r}: expected shared, per_position, in_batch or full")


# ---------------------------------------------------------------------------------- dense terms


def dense_bytes(
    num_params: int,
    zero_stage: int,
    world_size: int,
    precision: str,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    largest_layer_params: int = 0,
    reduce_bucket_elements: int = 0,
) -> dict[str, int]:
    """``dense_params``, ``dense_grads``, ``dense_optimizer``, ``dense_buffers`` of one rank.

    ``dense_buffers`` is DeepSpeed's gradient reduction bucket of ``reduce_bucket_elements``
    elements (its ``reduce_bucket_size``, 5e8 by default; the estimate passes DEEPSPEED_REDUCE_BUCKET).
    Stage 1 and 2 size it to at most the model (``setup_buckets``; fp32 at stage 1, the model's
    dtype at stage 2, where ``overlap_comm`` keeps two); the ``benchmarks/memory_bench.py`` zero
    section measures stage 2's pair alive after a step (stage 1's is freed by then: unverified).
    Stage 3 allocates the full ``reduce_bucket_size`` once at start-up in the gradients' dtype, plus
    its flat fp32 gradient partition (``grad_partitions_flat_buffer``, 4P / N): at the 5e8 default
    that is 1.86 GiB in fp32 whatever the model's size (measured).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage={zero_stage}: expected 0, 1, 2 or 3")
    if offload_params and zero_stage != 3:
        raise ValueError("offload_params needs zero_stage=3")
    if offload_optimizer and zero_stage == 0:
        raise ValueError("offload_optimizer needs zero_stage >= 1")
    p, n = num_params, world_size
    w = DTYPE_BYTES[precision]
    mixed = w != 4
    params = w * p if zero_stage < 3 else -(-w * p // n)
    if zero_stage == 3:
        working = w * min(p, 2 * largest_layer_params)
        params = working if offload_params else params + working
    grads = w * p if zero_stage < 2 else -(-w * p // n)
    if zero_stage == 0:
        optimizer = 8 * p + (4 * p if mixed else 0)
    else:
        optimizer = -(-12 * p // n)  # AdamW moments + the fp32 partition copy
        if mixed and zero_stage >= 2:
            grads += -(-4 * p // n)  # fp32 gradient partition
    if offload_optimizer:
        optimizer = 0
        if mixed and zero_stage >= 2:
            grads -= -(-4 * p // n)
    buffers = 0
    bucket = min(reduce_bucket_elements, p)
    if zero_stage == 1:
        buffers = bucket * 4
    elif zero_stage == 2:
        buffers = 2 * bucket * w  # overlap_comm double-buffers it (measured: both alive after a step)
    elif zero_stage == 3:
        buffers = reduce_bucket_elements * w + (0 if offload_optimizer else -(-4 * p // n))
    return {
        "dense_params": params,
        "dense_grads": grads,
        "dense_optimizer": optimizer,
        "dense_buffers": buffers,
    }


# ---------------------------------------------------------------------------- activation terms


def hstu_activations(
    dims: ModelDims, batch: BatchShape, dtype_bytes: int, checkpointing: bool, has_timestamps: bool = False
) -> dict[str, int]:
    """What HSTU's jagged path (train/models/hstu.py) keeps for backward, per rank.

    Per layer and token (D width, E = H d_qk, F = H d_v): the layer norm's input x and output (2D),
    the UVQK projection before and after SiLU (2 (2F + 2E); U is a view that keeps the whole SiLU
    output alive), the attention output, its layer norm and U * norm (or its dropout) (3F); with
    output dropout also a bool mask (F bytes). Padded per length group: Q, K, V (2E + F per padded
    token). Quadratic per layer: the SiLU input (scores + rab) and the masked weights, H per padded
    pair each (with attention dropout also a bool mask and the dropped copy). Shared by the layers:
    per group the causal mask (model dtype) and distances (int64), 8 + dtype bytes per N_g^2; the
    time-bias index (int64 per padded pair) when timestamps are used; the positions (int64), the
    input dropout's mask; the L2-normalised output and its input (2D). Backward's extra at its peak
    (measured): the gradient of one layer's UVQK output (2F + 2E per token) plus half a quadratic
    tensor.

    Checkpointing keeps each layer's input x (D per token) and the shared tensors but the normalised
    output, which the loss's backward frees before any layer is recomputed. Backward then recomputes
    one layer at a time; its working set peaks at one of two points of the recomputed forward
    (measured with MemTracker, ``benchmarks/memory_bench.py``, every ``*-ckpt`` config):

    - at the attention weights: the layer norm's output and the UVQK projection before and after SiLU
      (D + 4E + 4F per token), padded Q, K, V and the einsum's contiguous copies of Q and K
      (4E + F per padded token), and three quadratic tensors (scores, SiLU(scores), the masked
      weights; with attention dropout also its bool mask);
    - at U * norm: the same linear part, plus the copies of V and of the attention output (2F per
      padded token), the jagged attention output, its concatenation, its layer norm and U * norm
      (4F per token; with output dropout also the dropped copy and its mask), and two quadratic
      tensors (scores and weights; with attention dropout the dropped weights and the mask);

    plus the gradient flowing into the layer (D per token). ``recompute`` is that working set minus
    the normalised output and its input (alive at the end of the forward pass, freed by then).
    """
    d, b = dims.embedding_dim, dtype_bytes
    e, f, h = dims.num_heads * dims.attention_dim, dims.num_heads * dims.linear_dim, dims.num_heads
    t, pt, ps = batch.num_tokens, batch.padded_tokens, batch.padded_squares
    per_token = b * (2 * d + 4 * e + 7 * f) + (f if dims.dropout > 0 else 0)
    layer_linear = t * per_token + b * pt * (2 * e + f)
    attn_drop = dims.attn_dropout > 0
    quad_entry = 2 * b + ((1 + b) if attn_drop else 0)
    layer_quad = h * ps * quad_entry
    kept_shared = (8 + b) * batch.group_squares + 8 * t + (t * d if dims.dropout > 0 else 0)
    if dims.use_time_bias and has_timestamps:
        kept_shared += 8 * ps
    end_of_forward = 2 * b * t * d  # the L2-normalised output and its input
    backward_linear = b * t * (2 * f + 2 * e)
    backward_quad = b * h * ps // 2
    layers = dims.num_blocks
    if checkpointing:
        projected = b * t * (d + 4 * e + 4 * f) + b * pt * (4 * e + f)
        at_weights = projected + h * ps * (3 * b + (1 if attn_drop else 0))
        out_dropout = (b + 1) * t * f if dims.dropout > 0 else 0
        at_output = projected + b * pt * 2 * f + b * t * 4 * f + out_dropout
        at_output += h * ps * (2 * b + (1 if attn_drop else 0))
        working = max(at_weights, at_output) + b * t * d
        return _checkpointed(layers * b * t * d + kept_shared, end_of_forward, working)
    linear = layers * layer_linear
    quad = layers * layer_quad + backward_quad
    return {"activations": linear + kept_shared + end_of_forward + backward_linear, "attention": quad}


def sasrec_activations(
    dims: ModelDims,
    batch: BatchShape,
    dtype_bytes: int,
    checkpointing: bool,
    has_timestamps: bool = False,
    flash: bool = True,
) -> dict[str, int]:
    """What SASRec's jagged path (train/models/sasrec.py) keeps for backward, per rank.

    Per block and token: x, the query-side layer norm output, the attention output, the residual
    sum before the second norm and its output h (5D), the FFN's ReLU output (linear_dim; with
    dropout also the dropout output, and bool masks of linear_dim + D bytes). Padded (the batch to
    its longest row): Q, K, V and the attention output (4D per padded token). Quadratic per block,
    only with the math attention kernel (attention dropout on CPU): the softmax output (H per padded
    pair) plus its dropout mask and dropped copy; a fused kernel (flash / CPU flash, no attention
    dropout) keeps only a [B, H, N] logsumexp. Shared: the input dropout's mask and the
    L2-normalised output and its input (2D per token). Backward's extra at its peak (measured): the
    gradients of the padded Q, K, V, output (4D per padded token). Checkpointing: as for HSTU, with
    a recomputed block's working set measured at its FFN.
    """
    d, b, lin, h = dims.embedding_dim, dtype_bytes, dims.linear_dim, dims.num_heads
    t, pt, ps = batch.num_tokens, batch.padded_tokens, batch.padded_squares
    if dims.dropout > 0:
        per_token = b * (5 * d + 2 * lin) + lin + d
    else:
        per_token = b * (5 * d + lin)
    layer_linear = t * per_token + b * pt * 4 * d
    quad_entry = 0 if flash else b + ((1 + b) if dims.attn_dropout > 0 else 0)
    layer_quad = h * ps * quad_entry
    kept_shared = 8 * t + (t * d if dims.dropout > 0 else 0)
    end_of_forward = 2 * b * t * d  # the L2-normalised output and its input
    shared = kept_shared + end_of_forward
    backward_linear = b * pt * 4 * d
    backward_quad = 0 if flash else b * h * ps
    if checkpointing:
        # A recomputed block peaks at the FFN's ReLU (measured, the sasrec-ckpt config): the query-side
        # norm, K|V (3D), the jagged attention output, the residual sum and its norm (3D), the first
        # linear's output and the ReLU's (2 linear_dim; with dropout also its mask, unmeasured) per
        # token; padded Q, K, V and the attention output (4D per padded token); the math kernel's
        # quadratic tensors; and the gradient flowing into the block (D per token).
        working = t * (b * (6 * d + 2 * lin) + (lin if dims.dropout > 0 else 0)) + b * pt * 4 * d
        working += layer_quad + b * t * d
        return _checkpointed(dims.num_blocks * b * t * d + kept_shared, end_of_forward, working)
    linear = dims.num_blocks * layer_linear
    quad = dims.num_blocks * layer_quad + backward_quad
    return {"activations": linear + shared + backward_linear, "attention": quad}


def gru4rec_activations(
    dims: ModelDims, batch: BatchShape, dtype_bytes: int, checkpointing: bool, has_timestamps: bool = False
) -> dict[str, int]:
    """What GRU4Rec's path (train/models/gru4rec.py) keeps for backward, per rank.

    ``dims.linear_dim`` is the GRU's hidden size H and ``dims.num_blocks`` its layers. The GRU runs
    over the padded batch ([B, N]: every row to the batch's longest), one step per position, as
    PyTorch's composite GRU cell (the CPU path; cuDNN keeps a reserve space instead, unmeasured).
    Per padded token: layer 0's input (D, a contiguous copy for the input projection); per layer
    the step's gate pre-activations (3H), the copies two in-place multiplications save (2H), the
    candidate state (H) and the new state (H); a later layer also keeps its input (H) and, with
    ``hidden_dropout``, a bool mask (H bytes). Per token: the input dropout's bool mask (D bytes),
    the int64 indices of the padding and of the unpadding (32 bytes), the unpadded states (H) the
    projection saves, and its output and the L2-normalised output (2D).

    Backward's extra at its peak (measured) is the larger of: the L2 normalisation's backward (the
    query's gradient, its temporaries and the target rows' pending gradient: 5.5 fp32 [T, D]),
    and, once the projection's backward is done, the padded states' gradient (zeros plus the
    scattered copy, 2H per padded token) beside the unpadded one (H per token) and the pending
    target rows (fp32 D per token). No part is quadratic in the lengths. There are no blocks
    to checkpoint: the planner never proposes checkpointing for GRU4Rec.
    """
    if checkpointing:
        raise ValueError("model.name=gru4rec: activation checkpointing is not available (no blocks to wrap)")
    d, h, b, layers = dims.embedding_dim, dims.linear_dim, dtype_bytes, dims.num_blocks
    t, pt = batch.num_tokens, batch.padded_tokens
    per_padded = b * (d + 7 * h) + (layers - 1) * (b * 8 * h + (h if dims.hidden_dropout > 0 else 0))
    per_token = b * h + 32 + (d if dims.dropout > 0 else 0)
    end_of_forward = 2 * b * t * d  # the projection's output and the L2-normalised output
    at_norm = 22 * t * d  # 5.5 x 4 bytes
    at_unpad = 4 * t * d + b * t * h + 2 * b * pt * h
    kept = pt * per_padded + t * per_token + end_of_forward
    return {"activations": kept, "attention": 0, "backward": max(at_norm, at_unpad)}


def bert4rec_activations(
    dims: ModelDims,
    batch: BatchShape,
    dtype_bytes: int,
    checkpointing: bool,
    has_timestamps: bool = False,
    flash: bool = True,
) -> dict[str, int]:
    """What BERT4Rec's encoder (train/models/bert4rec.py) keeps for backward, per rank.

    Unlike SASRec's jagged blocks, BERT4Rec pads once after its input stage and runs every block on
    [B, N, D]; attention is bidirectional over the real keys (a bool key mask, no causal mask).
    Per block and padded token: the block's input, the fused Q|K|V projection (3D), the attention
    output, the two residual sums and the first norm's output (8D in all), the FFN's first linear
    output and the GELU's (2 linear_dim), the two norms' fp32 mean and rstd (16 bytes) and, with
    dropout, two bool masks (2D bytes). Attention: with a fused kernel (CUDA's memory-efficient
    kernel, which takes the mask; CPU flash without attention dropout) only a fp32 logsumexp per
    head and padded token; with the math kernel (CPU with attention dropout) the softmax output,
    the dropout mask (the model's dtype on CPU) and the dropped copy, H per padded pair each.
    Per token (the jagged input and output stages): the positions (int64) and the pad and unpad
    indices (2 int64 each), the input norm's input and stats, the input dropout's bool mask, the
    head's Linear input, GELU input and LayerNorm input (3D), the normalised output and its input
    (2D). Backward's extra at its peak: as for GRU4Rec, the L2 normalisation's backward (measured,
    5.5 fp32 [T, D]).

    Checkpointing (``checkpoint_layers`` wraps each block's ``forward``) keeps each block's padded
    input ([B, N, D]) and the input stage's tensors: the positions and pad_jagged's two indices
    (3 int64 per token), the input norm's input and stats, the input dropout's bool mask, the key
    mask. The output stage (the head's Linear input, GELU input, LayerNorm input and output, its
    stats, the L2 norm (2 values per token), unpad's bool mask and the query the loss reads,
    counted as the normalised output [T, D]: the real one, the masked [M, D] in fp32, is smaller
    while mask_prob <= 0.5) is alive at the end of the forward pass only: the loss's and the
    head's backward free it before the last block is recomputed. Backward then recomputes one
    block at a time; measured with MemTracker (``tests/test_memory.py``), its working set peaks at
    one of these points:

    - the end of the block (its last LayerNorm, or that norm's backward): everything the block
      saves but its input (Q|K|V, the attention output, the two residual sums, the first norm's
      output: 7D; the FFN's two linear_dim tensors; the norms' stats; the dropout masks), the block's
      output or the norm's input gradient (D) and the gradient flowing into the block (D). With the
      math kernel also its three quadratic tensors and its contiguous copies of Q, K^T, V and of
      the transposed output (4D more; Q|K|V and the attention output, which the fused kernel
      saves, are then held by the block's frame, still running);
    - the GELU's backward (linear_dim above D): the same but the second residual sum, the second
      norm's stats and the FFN's dropout mask, with three linear_dim tensors (the first linear's
      output and the gradients on both sides of the GELU) and the second residual sum's gradient;
    - with the math kernel, the attention's backward: its four copies, the gradients of V and of
      the first residual sum (6D) and four quadratic tensors (the saved three and the weights'
      gradient).

    plus the fused kernel's logsumexp and SDPA's float copy of the key mask (model dtype, B N).
    There is no ``backward`` term: the output stage's backward (the L2 normalisation's and the
    head's) stayed below a recomputed block in every case measured (fp32, linear_dim down to D / 4,
    a target at every position; bf16 unmeasured). Dropout masks are counted as bool (CUDA); on
    CPU they are in the model's dtype, which this under-counts by (dtype bytes - 1) per element.
    """
    d, b, lin, h = dims.embedding_dim, dtype_bytes, dims.linear_dim, dims.num_heads
    t, pt, ps = batch.num_tokens, batch.padded_tokens, batch.padded_squares
    if checkpointing:
        drop = dims.dropout > 0
        keys = batch.num_rows * batch.max_len  # B N: the bool key mask, unpad's bool mask
        kept = dims.num_blocks * b * pt * d + t * (24 + b * d + 8 + (d if drop else 0)) + keys
        end_of_forward = t * (5 * b * d + 8 + 2 * b) + keys
        lse = 4 * h if flash else 0  # the fused kernel's logsumexp, per padded token
        math_quad = 0 if flash else 3 * b * h * ps  # softmax, its dropout mask, the dropped copy
        at_block_end = pt * (b * (9 * d + 2 * lin) + 16 + (2 * d if drop else 0) + lse) + math_quad
        if not flash:
            at_block_end += pt * 4 * b * d  # the math kernel's copies of Q, K^T, V and its output
        at_gelu = pt * (b * (7 * d + 3 * lin) + 8 + (d if drop else 0) + lse) + math_quad
        at_attention = 0 if flash else pt * 6 * b * d + 4 * b * h * ps
        working = max(at_block_end, at_gelu, at_attention) + b * keys
        return _checkpointed(kept, end_of_forward, working)
    per_padded = b * (8 * d + 2 * lin) + 16 + (2 * d if dims.dropout > 0 else 0)
    per_padded += 4 * h if flash else 0  # the fused kernel's logsumexp
    quad_entry = 0 if flash else 3 * b
    per_token = 40 + b * d + 8 + (d if dims.dropout > 0 else 0) + 3 * b * d + 8
    end_of_forward = 2 * b * t * d
    shared = t * per_token + batch.num_rows * batch.max_len  # + the bool key mask
    linear = dims.num_blocks * pt * per_padded + shared + end_of_forward
    quad = dims.num_blocks * h * ps * quad_entry
    return {"activations": linear, "attention": quad, "backward": 22 * t * d}


def _checkpointed(kept: int, end_of_forward: int, working: int) -> dict[str, int]:
    """Activation terms under checkpointing.

    ``kept``: what the forward keeps for the whole backward (each layer's input, the shared
    tensors); ``end_of_forward``: what is alive only at the forward's end (the normalised output);
    ``working``: one recomputed layer's peak working set in backward. ``activations`` is alive at
    the end of the forward pass; ``recompute`` is how much more the recompute phase holds (may be
    negative). The loss's backward frees the loss buffers before any layer is recomputed, so
    ``estimate_memory`` charges ``max(0, recompute + pending row gradients - loss)``: the peak is at
    the end of the forward pass or inside a recomputed layer.
    """
    return {"activations": kept + end_of_forward, "attention": 0, "recompute": working - end_of_forward}


# A model family provides its activation term here, keyed by model.name (TIGER adds its own):
# fn(dims, batch, dtype_bytes, checkpointing, has_timestamps) -> {"activations": bytes kept for
# backward, linear in the tokens; "attention": the part quadratic in the lengths; with checkpointing
# also "recompute": how much more a recomputed layer holds in backward (see _checkpointed);
# optionally "backward": backward's extra at its peak, which comes after the loss buffers are freed,
# so the family charges max(0, backward - loss) as the "backward" term (GRU4Rec; BERT4Rec without
# checkpointing)}.
ActivationFn = Callable[..., dict]
ACTIVATION_MODELS: dict[str, ActivationFn] = {
    "hstu": hstu_activations,
    "sasrec": sasrec_activations,
    "gru4rec": gru4rec_activations,
    "bert4rec": bert4rec_activations,
}


# ------------------------------------------------------------------------------------ the total


@dataclass
class MemoryEstimate:
    """Every term in bytes, their sum and the sum with the allocator margin."""

    terms: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.terms.values())

    @property
    def margin(self) -> int:
        return margin_bytes(self.total)

    @property
    def with_margin(self) -> int:
        return self.total + self.margin

    def largest_term(self) -> tuple[str, int]:
        return max(self.terms.items(), key=lambda kv: kv[1])


def margin_bytes(total: int) -> int:
    """The allocator margin added on top of the modelled bytes."""
    return int(MARGIN_FRACTION * total) + MARGIN_FIXED_BYTES


# ------------------------------------------------------------------------------ model families


class FamilyMemory(abc.ABC):
    """A model family's part of the memory model: its table and dense shapes, its per-step terms.

    A family provides one through its task (``Task.memory_model(cfg)``, ``train/tasks/``), so the
    planner and ``estimate_memory`` reach every family through the task registry: the retrieval task
    (HSTU, SASRec) returns ``RetrievalMemory`` below, TIGER its own (``train/tasks/tiger.py``).
    ``device_type`` is ``"cuda"`` when planning (fused attention kernels, bool dropout masks) and
    ``"cpu"`` to compare with CPU measurements (``benchmarks/memory_bench.py``).
    """

    name: str
    max_seq_len: int  # the longest model input of a row, in items (the unit of token budgets)
    supports_checkpointing: bool = True  # schedule.activation_checkpointing can wrap its layers

    @abc.abstractmethod
    def table_shape(self, num_items: int) -> tuple[int, int]:
        """(rows, embedding width) of the family's TorchRec table."""

    @abc.abstractmethod
    def num_params(self) -> int:
        """Parameters of the dense module (the DeepSpeed engine's)."""

    @abc.abstractmethod
    def largest_layer_params(self) -> int:
        """Parameters of the largest layer (ZeRO-3 gathers a layer at a time)."""

    @abc.abstractmethod
    def batch_from_lengths(self, lengths) -> BatchShape:
        """The exact shape of a batch whose rows have model-input lengths ``lengths``."""

    @abc.abstractmethod
    def batch_bound(self, num_tokens: int, sum_squares: int | None = None) -> BatchShape:
        """The worst batch a token budget (and attention-cost budget) admits."""

    @abc.abstractmethod
    def step_terms(
        self, batch: BatchShape, *, num_items: int, dtype_bytes: int, checkpointing: bool,
        has_timestamps: bool, device_type: str,
    ) -> dict[str, int]:  # fmt: skip
        """Per-step terms: ``lookup``, ``activations``, ``attention``, ``loss`` and, with
        checkpointing, ``recompute`` (the excess of backward's recompute phase over the rest)."""

    @abc.abstractmethod
    def step_flops(self, batch: BatchShape, num_items: int) -> float:
        """Forward + backward FLOPs of one micro-step (the planner's cost model)."""

    @abc.abstractmethod
    def lookup_rows(self, batch: BatchShape, num_items: int) -> int:
        """Table rows one micro-step looks up (the lookup's all-to-all traffic)."""


class RetrievalMemory(FamilyMemory):
    """HSTU, SASRec and GRU4Rec under the retrieval task: an item table, the encoder, a softmax over
    items (BERT4Rec's ``Bert4RecMemory`` in ``train/tasks/bert4rec.py`` builds on it)."""

    def __init__(self, dims: ModelDims, negatives: str, num_negatives: int):
        self.dims, self.negatives, self.num_negatives = dims, negatives, num_negatives
        self.name, self.max_seq_len = dims.name, dims.max_seq_len
        # checkpoint_layers wraps HSTU layers and SASRec blocks; a GRU has none.
        self.supports_checkpointing = dims.name in ("hstu", "sasrec")

    @classmethod
    def from_config(cls, cfg) -> RetrievalMemory:
        return cls(model_dims(cfg), cfg.loss.negatives, cfg.loss.num_negatives)

    def table_shape(self, num_items: int) -> tuple[int, int]:
        return num_items + 1, self.dims.embedding_dim

    def num_params(self) -> int:
        return self.dims.num_params()

    def largest_layer_params(self) -> int:
        return self.dims.largest_layer_params()

    def batch_from_lengths(self, lengths) -> BatchShape:
        return BatchShape.from_lengths(lengths, self.name)

    def batch_bound(self, num_tokens: int, sum_squares: int | None = None) -> BatchShape:
        return BatchShape.bound(num_tokens, self.max_seq_len, self.name, sum_squares)

    def step_terms(
        self, batch: BatchShape, *, num_items: int, dtype_bytes: int, checkpointing: bool,
        has_timestamps: bool, device_type: str,
    ) -> dict[str, int]:  # fmt: skip
        dims, neg, k = self.dims, self.negatives, self.num_negatives
        targets, (rows, _) = self.loss_positions(batch), self.table_shape(num_items)
        terms = {"lookup": lookup_bytes(batch, dims.embedding_dim, neg, k, num_items, targets, rows)}
        # Fused attention kernels (flash / memory-efficient on CUDA, CPU flash without attention
        # dropout) keep no [N, N] tensor.
        flash = device_type == "cuda" or dims.attn_dropout == 0
        kwargs = {"flash": flash} if dims.name in ("sasrec", "bert4rec") else {}
        act = dict(
            ACTIVATION_MODELS[dims.name](dims, batch, dtype_bytes, checkpointing, has_timestamps, **kwargs)
        )
        recompute = act.pop("recompute", 0)
        backward = act.pop("backward", None)
        terms.update(act)
        loss_batch = dataclasses.replace(batch, num_tokens=targets)  # the loss sees its positions only
        terms["loss"] = loss_bytes(loss_batch, dims.embedding_dim, neg, k, num_items)
        if backward is not None:  # backward's extra, alive once the loss buffers are freed
            terms["backward"] = max(0, backward - terms["loss"])
        if checkpointing:
            # Recomputed layers live after the loss buffers are freed, beside the target and negative
            # rows' gradients, one target per loss position (see _checkpointed).
            pending = pending_rows_grad_bytes(loss_batch, dims.embedding_dim, neg, k, num_items)
            terms["recompute"] = max(0, recompute + pending - terms["loss"])
        return terms

    def loss_positions(self, batch: BatchShape) -> int:
        """Positions the loss is taken at (one target each): every input position for next-item
        retrieval; BERT4Rec's masked ones (``Bert4RecMemory``)."""
        return batch.num_tokens

    def _negatives(self, batch: BatchShape, num_items: int) -> int:
        n, k = self.loss_positions(batch), self.num_negatives
        return {"shared": k, "per_position": n * k, "in_batch": 0, "full": num_items}[self.negatives]

    def step_flops(self, batch: BatchShape, num_items: int) -> float:
        """``6 P_layers T + 6 L (E + F) S + 6 T C D`` (matmuls, attention over the padded pairs S, the
        loss over C scored items per position). GRU4Rec: ``6 P_gru T_padded + 6 P_out T + 6 T C D``
        (the GRU steps over every padded position; no attention)."""
        dims, t = self.dims, batch.num_tokens
        scored = t if self.negatives == "in_batch" else self.num_negatives
        scored = num_items if self.negatives == "full" else scored
        if dims.name == "gru4rec":
            gru = 6 * sum(dims.layer_params()) * batch.padded_tokens
            return gru + 6 * dims.head_params() * t + 6 * t * scored * dims.embedding_dim
        p_layers = dims.num_params() - dims.max_seq_len * dims.embedding_dim
        e = dims.num_heads * dims.attention_dim if dims.name == "hstu" else dims.embedding_dim
        f = dims.num_heads * dims.linear_dim if dims.name == "hstu" else dims.embedding_dim
        flops = 6 * p_layers * t + 6 * dims.num_blocks * (e + f) * batch.padded_squares
        return flops + 6 * t * scored * dims.embedding_dim

    def lookup_rows(self, batch: BatchShape, num_items: int) -> int:
        """Inputs, one target per loss position and the negatives, at most the table's rows."""
        looked_up = batch.num_tokens + self.loss_positions(batch) + self._negatives(batch, num_items)
        return min(looked_up, self.table_shape(num_items)[0])


def family_memory(cfg) -> FamilyMemory:
    """The memory model of ``cfg.model.name``'s family, from its task (``train.tasks.TASKS``)."""
    from train.tasks import TASKS

    task = TASKS.get(cfg.model.name)
    if task is None:
        raise ValueError(f"model.name={cfg.model.name!r}: no task; known: {', '.join(TASKS)}")
    return task.memory_model(cfg)


def estimate_memory(
    cfg,
    *,
    world_size: int,
    local_world_size: int,
    num_items: int,
    batch: BatchShape,
    precision: str = "bf16",
    checkpointing: bool = False,
    has_timestamps: bool = False,
    device_type: str = "cuda",
    family: FamilyMemory | None = None,
) -> MemoryEstimate:
    """All terms for ``cfg`` (a ``TrainConfig``) on one rank of ``world_size`` with ``batch``.

    ``family``: the model family's memory model (default: ``family_memory(cfg)``; the planner passes
    it once for its many candidates).
    """
    family = family or family_memory(cfg)
    if checkpointing and not family.supports_checkpointing:
        raise ValueError(
            f"model.name={family.name}: activation checkpointing is not available for this family"
        )
    emb = cfg.embeddings
    rows, width = family.table_shape(num_items)
    terms = dict(
        embedding_bytes(
            rows, width, emb.sharding_type, emb.optimizer, world_size, local_world_size, emb.min_partition
        )
    )
    terms.update(
        dense_bytes(
            family.num_params(), cfg.zero.stage, world_size, precision, cfg.zero.offload_optimizer,
            cfg.zero.offload_params, family.largest_layer_params(), DEEPSPEED_REDUCE_BUCKET,
        )
    )  # fmt: skip
    terms.update(
        family.step_terms(
            batch, num_items=num_items, dtype_bytes=DTYPE_BYTES[precision], checkpointing=checkpointing,
            has_timestamps=has_timestamps, device_type=device_type,
        )
    )  # fmt: skip
    return MemoryEstimate(terms)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Mean length, mean l^2 and max of a length sample (the planner's view of a data set)."""
    lengths = np.asarray(lengths, dtype=np.float64)
    return {"mean": float(lengths.mean()), "mean_sq": float((lengths**2).mean()), "max": float(lengths.max())}


def fmt_bytes(n: float) -> str:
    """``1.50 GiB`` / ``12.0 MiB`` / ``512 B``."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{int(n)} B"


def parse_bytes(text: str) -> int:
    """``80GiB``, ``40GB``, ``24G``, ``512MiB`` or a plain number of bytes -> bytes."""
    s = text.strip().replace(" ", "")
    units = {"gib": GiB, "gb": 10**9, "g": GiB, "mib": MiB, "mb": 10**6, "m": MiB, "tib": 1024 * GiB}
    for suffix in sorted(units, key=len, reverse=True):
        if s.lower().endswith(suffix):
            try:
                return int(float(s[: -len(suffix)]) * units[suffix])
            except ValueError:
                break
    try:
        return int(float(s))
    except ValueError:
        raise ValueError(
            f"memory size {text!r}: expected e.g. 80GiB, 40GB, 24G or a number of bytes"
        ) from None
