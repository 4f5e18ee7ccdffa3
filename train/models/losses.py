"""Sampled softmax and binary losses over L2-normalised embeddings, and uniform negative sampling.

For a supervised position with query q (the encoder output, already L2-normalised), target item p and
negatives n_1..n_K (item embeddings, L2-normalised here), with temperature tau:

    loss = -log( exp(q.p / tau) / (exp(q.p / tau) + sum_k exp(q.n_k / tau)) )

A negative whose id equals the target's ("accidental hit") is dropped from the sum (logit -inf).
Two ways to get negatives:

- ``sampled_softmax_loss``: K sampled negatives per position ``[N, K, D]`` (the HSTU reference:
  128 per position) or K shared by the whole batch ``[K, D]`` (one matmul, so many more negatives
  for the same cost);
- ``in_batch_softmax_loss``: the other positions' targets are the negatives (no sampling, no extra
  embedding lookups; popular items are over-represented as negatives, and no logQ correction is
  applied here).

- ``full_softmax_loss``: every item is a negative (the exact softmax): one ``[N, I]`` matmul and a
  cross-entropy, no sampling; affordable for catalogs up to ~100K items.

- ``sampled_binary_loss``: the SASRec paper's objective on the same logits: each position's target
  against each of its sampled negatives as independent binary decisions,
  ``-log sigmoid(q.p / tau) - sum_k log(1 - sigmoid(q.n_k / tau))`` (accidental hits dropped).

All return ``(sum of per-position losses, number of positions)`` so that the trainer can average
over all positions of all ranks: ``all_reduce(sum) / all_reduce(count)``.

Shape legend: N supervised positions, K negatives, D embedding dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from train.models.jagged import L2_NORM_EPS


def sample_negatives(
    num_items: int, shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform int64 item ids in ``1..num_items`` (0 is padding), on the generator's device."""
    if num_items < 1:
        raise ValueError(
            f"num_items: expected the largest item id (>= 1, from the manifest), got {num_items}"
        )
    device = generator.device if generator is not None else None
    return torch.randint(
        1, num_items + 1, tuple(shape), generator=generator, device=device, dtype=torch.int64
    )


def _cosine(query_ND: Tensor, items_NKD: Tensor, temperature: float) -> Tensor:
    """``[N, K]`` logits ``query . normalize(item) / temperature`` for per-position items.

    Divides the dot products by the item norms instead of normalising ``[N, K, D]`` first: with 128
    negatives per position that tensor is the biggest in the step, and ``F.normalize`` plus its
    backward would make several more copies of it.
    """
    dots_NK = torch.bmm(items_NKD, query_ND.unsqueeze(-1)).squeeze(-1)
    norms_NK = torch.linalg.vector_norm(items_NKD, dim=-1).clamp_min(L2_NORM_EPS)
    return dots_NK / (norms_NK * temperature)


def _check_common(query: Tensor, pos_emb: Tensor, pos_ids: Tensor, temperature: float) -> None:
    if query.dim() != 2 or pos_emb.shape != query.shape:
        raise ValueError(
            f"query and pos_emb: expected the same [N, D] shape, got {tuple(query.shape)} and {tuple(pos_emb.shape)}"
        )
    if pos_ids.shape != query.shape[:1]:
        raise ValueError(f"pos_ids: expected [N] = [{query.shape[0]}], got {tuple(pos_ids.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature: expected > 0, got {temperature}")


def sampled_softmax_loss(
    query: Tensor,
    pos_emb: Tensor,
    pos_ids: Tensor,
    neg_emb: Tensor,
    neg_ids: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """Sampled softmax with per-position (``neg_emb [N, K, D]``) or shared (``[K, D]``) negatives.

    ``query`` ``[N, D]`` must already be L2-normalised; ``pos_emb`` ``[N, D]`` and ``neg_emb`` are
    normalised here. ``neg_ids`` is ``[N, K]`` or ``[K]`` like ``neg_emb``. Returns the sum of the N
    per-position losses and N (int64 scalar tensor).
    """
    _check_common(query, pos_emb, pos_ids, temperature)
    _check_sampled(query, neg_emb, neg_ids)
    num_pos = query.shape[0]
    pos_logits_N1, neg_logits_NK, hits_NK = _sampled_logits(
        query, pos_emb, pos_ids, neg_emb, neg_ids, temperature
    )
    neg_logits_NK = neg_logits_NK.masked_fill(hits_NK, float("-inf"))
    logits_N1K = torch.cat([pos_logits_N1, neg_logits_NK], dim=1)
    losses_N = -F.log_softmax(logits_N1K, dim=1)[:, 0]
    return losses_N.sum(), torch.tensor(num_pos, dtype=torch.int64, device=query.device)


def _check_sampled(query: Tensor, neg_emb: Tensor, neg_ids: Tensor) -> None:
    num_pos, dim = query.shape
    if neg_emb.dim() == 3:
        if neg_emb.shape[0] != num_pos or neg_emb.shape[2] != dim or neg_ids.shape != neg_emb.shape[:2]:
            raise ValueError(
                f"per-position negatives: expected neg_emb [N={num_pos}, K, D={dim}] and neg_ids [N, K], "
                f"got {tuple(neg_emb.shape)} and {tuple(neg_ids.shape)}"
            )
    elif neg_emb.dim() == 2:
        if neg_emb.shape[1] != dim or neg_ids.shape != neg_emb.shape[:1]:
            raise ValueError(
                f"shared negatives: expected neg_emb [K, D={dim}] and neg_ids [K], "
                f"got {tuple(neg_emb.shape)} and {tuple(neg_ids.shape)}"
            )
    else:
        raise ValueError(f"neg_emb: expected [N, K, D] or [K, D], got shape {tuple(neg_emb.shape)}")


def _sampled_logits(
    query: Tensor, pos_emb: Tensor, pos_ids: Tensor, neg_emb: Tensor, neg_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor, Tensor]:
    """``(pos_logits [N, 1], neg_logits [N, K], hits [N, K])``: cosine / temperature of each position's
    target and negatives (per-position ``[N, K, D]`` or shared ``[K, D]``), and which negatives have
    the target's id. The same logits as evaluation's scores (up to the constant temperature)."""
    pos_norms_N1 = torch.linalg.vector_norm(pos_emb, dim=-1, keepdim=True).clamp_min(L2_NORM_EPS)
    pos_logits_N1 = (query * pos_emb).sum(-1, keepdim=True) / (pos_norms_N1 * temperature)
    if neg_emb.dim() == 3:
        neg_logits_NK = _cosine(query, neg_emb, temperature)
        hits_NK = neg_ids == pos_ids[:, None]
    else:
        # Normalise and scale the K shared rows, not the [N, K] logits.
        scaled_neg_KD = F.normalize(neg_emb, dim=-1, eps=L2_NORM_EPS) / temperature
        neg_logits_NK = query @ scaled_neg_KD.T
        hits_NK = (neg_ids[None, :] == pos_ids[:, None]).expand_as(neg_logits_NK)
    return pos_logits_N1, neg_logits_NK, hits_NK


def sampled_binary_loss(
    query: Tensor,
    pos_emb: Tensor,
    pos_ids: Tensor,
    neg_emb: Tensor,
    neg_ids: Tensor,
    temperature: float,
) -> tuple[Tensor, Tensor]:
    """SASRec's binary cross-entropy (Kang & McAuley 2018, Eq. 5) on the sampled-softmax logits.

    Per position: ``-log sigmoid(s_pos) - sum_k log(1 - sigmoid(s_neg_k))`` with ``s = cosine /
    temperature`` (the logits ``sampled_softmax_loss`` uses, so evaluation scores are unchanged).
    Negatives are per-position ``neg_emb [N, K, D]`` or shared ``[K, D]`` with ``neg_ids`` alike. A
    negative with the target's id (an accidental hit) is dropped from the sum, as in
    ``sampled_softmax_loss``: the same item is never pushed both up and down. Returns the sum of the
    N per-position losses and N, so the trainer's global mean is over target positions.
    """
    _check_common(query, pos_emb, pos_ids, temperature)
    _check_sampled(query, neg_emb, neg_ids)
    pos_logits_N1, neg_logits_NK, hits_NK = _sampled_logits(
        query, pos_emb, pos_ids, neg_emb, neg_ids, temperature
    )
    # -log sigmoid(x) = softplus(-x), -log(1 - sigmoid(x)) = softplus(x): stable for large |x| (1/tau = 20).
    neg_terms_NK = torch.where(hits_NK, 0.0, F.softplus(neg_logits_NK))
    losses_N = F.softplus(-pos_logits_N1[:, 0]) + neg_terms_NK.sum(dim=1)
    return losses_N.sum(), torch.tensor(query.shape[0], dtype=torch.int64, device=query.device)


def in_batch_softmax_loss(
    query: Tensor, pos_emb: Tensor, pos_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Softmax against in-batch negatives: position i's negatives are the targets of all positions j != i.

    Positions whose target has the same id as i's are not negatives for i (masked). ``query``
    ``[N, D]`` must be L2-normalised; ``pos_emb`` is normalised here. Returns (sum of losses, N).
    """
    _check_common(query, pos_emb, pos_ids, temperature)
    num_pos = query.shape[0]
    scaled_pos_ND = F.normalize(pos_emb, dim=-1, eps=L2_NORM_EPS) / temperature
    logits_NN = query @ scaled_pos_ND.T
    # Diagonal = own target (the positive); same-id entries off the diagonal are accidental hits.
    hits_NN = pos_ids[:, None] == pos_ids[None, :]
    hits_NN.fill_diagonal_(False)
    logits_NN = logits_NN.masked_fill(hits_NN, float("-inf"))
    targets_N = torch.arange(num_pos, device=query.device)
    loss_sum = F.cross_entropy(logits_NN, targets_N, reduction="sum")
    return loss_sum, torch.tensor(num_pos, dtype=torch.int64, device=query.device)


def full_softmax_loss(
    query: Tensor, item_emb: Tensor, pos_ids: Tensor, temperature: float
) -> tuple[Tensor, Tensor]:
    """Exact softmax over all items: ``item_emb`` ``[I, D]`` holds items ``1..I`` in id order.

    Equals ``sampled_softmax_loss`` with shared negatives ``1..I`` (where the target's own column is
    the masked accidental hit), without the mask and the concatenation: on ML-1M the ``[N, I]``
    logits are the largest tensors of the step. ``query`` ``[N, D]`` must be L2-normalised.
    Returns (sum of the N losses, N).
    """
    _check_common(query, query, pos_ids, temperature)
    if item_emb.dim() != 2 or item_emb.shape[1] != query.shape[1]:
        raise ValueError(f"item_emb: expected [I, D={query.shape[1]}], got {tuple(item_emb.shape)}")
    scaled_ID = F.normalize(item_emb, dim=-1, eps=L2_NORM_EPS) / temperature
    logits_NI = query @ scaled_ID.T
    loss_sum = F.cross_entropy(logits_NI, pos_ids - 1, reduction="sum")
    return loss_sum, torch.tensor(query.shape[0], dtype=torch.int64, device=query.device)
