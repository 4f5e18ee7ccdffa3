"""Beam search over semantic-ID tuples, optionally constrained to the catalogue's valid tuples.

The prefix trie (``SemanticIdTrie``) holds the N unique tuples of length L as tensors, level by
level, in CSR form: the nodes at depth d are the distinct prefixes of length d in lexicographic
order, so the children of a depth-d node are a contiguous run of depth-(d+1) nodes, sorted by their
last code. Per depth it stores ``child_start`` ([num_nodes(d) + 1], where node i's children begin)
and ``child_code`` ([num_nodes(d + 1)], each child's code); the leaves (depth L) map to item rows
through ``leaf_item``.

Why CSR and not a dense transition table: a dense ``[nodes, V]`` table at the deep levels costs
nodes x V entries, e.g. 10^6 prefixes x 256 codes x 8 bytes = 2 GB per level at 10^6 items, almost
all empty. CSR costs two integers per node, O(N * L) in total (~50 MB at 10^6 items, 4 levels), and
a step needs no search: a beam at node i scores its children ``child_start[i] + 0 .. C - 1`` (C = the
most children any node of that depth has, masked beyond the node's own count), and the winning
(beam, slot) pair directly gives the child node. All of it is batched gather / top-k over
[B, K, C], with no Python loop over users or beams. Unconstrained decoding checks its tuples level
by level with ``searchsorted`` on the sorted child keys ``parent * V + code``.

Scores are the model's log-likelihood: log-softmax over the level's whole codebook, summed over
levels. Constrained search masks invalid codes but does not renormalise, so its scores equal the
likelihood of the item's full tuple and ranking by them ranks items by likelihood. With a beam at
least as wide as every trie level it is exhaustive, hence exact.

Shape legend: B users, K beams, C children slots, V codebook size, L levels, N items.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class SemanticIdTrie:
    """The valid tuples as a CSR prefix trie (see the module docstring); build with ``from_codes``."""

    codebook_sizes: list[int]
    child_start: list[Tensor]  # per depth d in 0..L-1: int64 [num_nodes(d) + 1]
    child_code: list[Tensor]  # per depth d in 0..L-1: int64 [num_nodes(d + 1)], the code of each child
    child_key: list[Tensor]  # per depth d: int64 [num_nodes(d + 1)], parent * V_d + code (sorted)
    max_children: list[int]  # per depth d: the most children of any depth-d node
    leaf_item: Tensor  # int64 [N]: item row of each leaf (depth-L node)

    @property
    def num_levels(self) -> int:
        return len(self.codebook_sizes)

    @property
    def num_items(self) -> int:
        return int(self.leaf_item.numel())

    @property
    def nodes_per_level(self) -> list[int]:
        """Number of distinct prefixes of length 1..L."""
        return [int(c.numel()) for c in self.child_code]

    def memory_bytes(self) -> int:
        tensors = [*self.child_start, *self.child_code, *self.child_key, self.leaf_item]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device) -> SemanticIdTrie:
        move = lambda ts: [t.to(device) for t in ts]  # noqa: E731
        return SemanticIdTrie(
            self.codebook_sizes, move(self.child_start), move(self.child_code), move(self.child_key),
            self.max_children, self.leaf_item.to(device),
        )  # fmt: skip

    @classmethod
    def from_codes(cls, codes_NL, codebook_sizes) -> SemanticIdTrie:
        """Build from unique tuples ``codes_NL`` ([N, L], codes of level l in [0, codebook_sizes[l]));
        leaf ``j`` maps back to row ``leaf_item[j]`` of ``codes_NL``."""
        codes_NL = np.asarray(codes_NL, dtype=np.int64)
        n, num_levels = codes_NL.shape
        if len(codebook_sizes) != num_levels:
            raise ValueError(f"{len(codebook_sizes)} codebook sizes for {num_levels} levels")
        if n == 0:
            raise ValueError("cannot build a trie of an empty catalogue")
        for level, size in enumerate(codebook_sizes):
            if codes_NL[:, level].min() < 0 or codes_NL[:, level].max() >= size:
                raise ValueError(f"level {level} has codes outside [0, {size})")
        # np.lexsort sorts by its last key first: level 0 is the primary key.
        order = np.lexsort([codes_NL[:, level] for level in reversed(range(num_levels))])
        sorted_NL = codes_NL[order]
        new_prefix = np.zeros(n, dtype=bool)  # True where the row starts a new prefix of the current length
        new_prefix[0] = True
        parent_node = np.zeros(n, dtype=np.int64)  # the row's node at the previous depth (root: 0)
        child_start, child_code, child_key, max_children = [], [], [], []
        for level in range(num_levels):
            new_prefix[1:] |= sorted_NL[1:, level] != sorted_NL[:-1, level]
            node = np.cumsum(new_prefix) - 1
            first = np.flatnonzero(new_prefix)
            parents = parent_node[first]
            codes = sorted_NL[first, level]
            num_parents = int(parent_node[-1]) + 1
            counts = np.bincount(parents, minlength=num_parents)
            child_start.append(torch.from_numpy(np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)))
            child_code.append(torch.from_numpy(codes.copy()))
            child_key.append(torch.from_numpy(parents * codebook_sizes[level] + codes))
            max_children.append(int(counts.max()))
            parent_node = node
        if int(parent_node[-1]) + 1 != n:
            raise ValueError(f"{n - int(parent_node[-1]) - 1} duplicate tuples: semantic IDs must be unique")
        return cls(
            codebook_sizes=[int(v) for v in codebook_sizes],
            child_start=child_start,
            child_code=child_code,
            child_key=child_key,
            max_children=max_children,
            leaf_item=torch.from_numpy(order.astype(np.int64)),
        )

    def lookup(self, codes_XL: Tensor) -> Tensor:
        """Item row of each tuple ``codes_XL`` ([..., L]), or -1 where the tuple is not an item."""
        flat_XL = codes_XL.reshape(-1, self.num_levels).long()
        node_X = torch.zeros(flat_XL.shape[0], dtype=torch.long, device=flat_XL.device)
        found_X = torch.ones_like(node_X, dtype=torch.bool)
        for level in range(self.num_levels):
            keys = self.child_key[level]
            code_X = flat_XL[:, level]
            found_X &= (code_X >= 0) & (code_X < self.codebook_sizes[level])
            key_X = node_X * self.codebook_sizes[level] + code_X
            pos_X = torch.searchsorted(keys, key_X).clamp(max=keys.numel() - 1)
            found_X &= keys[pos_X] == key_X
            node_X = torch.where(found_X, pos_X, 0)
        item_X = torch.where(found_X, self.leaf_item[node_X], -1)
        return item_X.view(codes_XL.shape[:-1])


@dataclass
class BeamSearchResult:
    """The top-K of each user, best first.

    ``item_index_BK``: item rows (of the codes the trie was built from), -1 where the slot holds no
    item (an invalid tuple in unconstrained mode, or fewer than K reachable items). ``logprob_BK``:
    total log-likelihood of the tuple (-inf for empty slots). ``codes_BKL``: the decoded tuples.
    ``invalid_rate``: share of returned (finite-score) tuples that are not items (0 when constrained).
    """

    item_index_BK: Tensor
    logprob_BK: Tensor
    codes_BKL: Tensor
    invalid_rate: float


StepFn = Callable[[int, Tensor, Tensor | None], Tensor]


@torch.no_grad()
def beam_search(
    step_fn: StepFn,
    trie: SemanticIdTrie,
    batch_size: int,
    beam_size: int,
    num_levels: int,
    constrained: bool = True,
) -> BeamSearchResult:
    """Top-``beam_size`` tuples per user by total log-likelihood.

    ``step_fn(level, prefix_codes_BKl, parent_BK)`` returns the logits (or log-probabilities)
    ``[B, K', V_level]`` of level ``level``'s codes after each prefix (``[B, K', level]`` codes; K' = 1
    at level 0, where all beams share the empty prefix, else at most ``beam_size``). ``parent_BK``
    says which beam of the previous call each prefix extends (None at level 0), so a step function
    can reorder a decoder cache. Constrained: only prefixes of valid tuples are
    expanded. Unconstrained: any code; tuples that are not items get item index -1 and are counted in
    ``invalid_rate``. ``trie`` must be on the device of the logits.
    """
    if num_levels != trie.num_levels:
        raise ValueError(f"num_levels={num_levels} but the trie has {trie.num_levels} levels")
    device = trie.leaf_item.device
    b, k = batch_size, beam_size
    prefix_BKl = torch.zeros(b, 1, 0, dtype=torch.long, device=device)
    score_BK = torch.zeros(b, 1, device=device)
    node_BK = torch.zeros(b, 1, dtype=torch.long, device=device)  # trie node of each beam (constrained)
    beam_BK = None  # the beam of the previous step that each current beam extends
    for level in range(num_levels):
        logprob_BKV = F.log_softmax(step_fn(level, prefix_BKl, beam_BK).float(), dim=-1)
        num_beams = prefix_BKl.shape[1]
        if constrained:
            starts = trie.child_start[level]
            slot_C = torch.arange(trie.max_children[level], device=device)
            child_BKC = starts[node_BK][..., None] + slot_C
            valid_BKC = child_BKC < starts[node_BK + 1][..., None]
            child_BKC = torch.where(valid_BKC, child_BKC, 0)
            code_BKC = trie.child_code[level][child_BKC]
            cand_BKC = logprob_BKV.gather(-1, code_BKC).masked_fill(~valid_BKC, float("-inf"))
        else:
            code_BKC = torch.arange(logprob_BKV.shape[-1], device=device).expand_as(logprob_BKV)
            cand_BKC = logprob_BKV
        num_slots = cand_BKC.shape[-1]
        total_BX = (score_BK[..., None] + cand_BKC).reshape(b, num_beams * num_slots)
        score_BK, flat_BK = total_BX.topk(min(k, total_BX.shape[1]), dim=1)
        beam_BK = flat_BK // num_slots
        code_BK = code_BKC.reshape(b, -1).gather(1, flat_BK)
        prefix_BKl = torch.cat(
            [prefix_BKl.gather(1, beam_BK[..., None].expand(-1, -1, level)), code_BK[..., None]], dim=2
        )
        if constrained:
            node_BK = child_BKC.reshape(b, -1).gather(1, flat_BK)
    if score_BK.shape[1] < k:  # fewer candidates than beams in total: pad the empty slots
        pad = k - score_BK.shape[1]
        score_BK = F.pad(score_BK, (0, pad), value=float("-inf"))
        prefix_BKl = F.pad(prefix_BKl, (0, 0, 0, pad), value=0)
        node_BK = F.pad(node_BK, (0, pad), value=0)
    live_BK = torch.isfinite(score_BK)
    if constrained:
        item_BK = torch.where(live_BK, trie.leaf_item[node_BK], -1)
        invalid_rate = 0.0
    else:
        item_BK = torch.where(live_BK, trie.lookup(prefix_BKl), -1)
        num_live = int(live_BK.sum())
        invalid_rate = float(((item_BK < 0) & live_BK).sum()) / max(num_live, 1)
    return BeamSearchResult(
        item_index_BK=item_BK, logprob_BK=score_BK, codes_BKL=prefix_BKl, invalid_rate=invalid_rate
    )
