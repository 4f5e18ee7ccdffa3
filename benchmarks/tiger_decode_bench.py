"""TIGER decoding throughput against catalogue size: constrained beam search vs unconstrained.

The paper's model (``TigerConfig()`` defaults: 4+4 layers, 6 heads x 64, d_model 128, d_ff 1024)
with random weights decodes batches of users (default 256 users, beam 20, 20 history items = 81
encoder tokens) against synthetic catalogues of 10^3 .. 10^6 unique IDs (3 random levels x 256 codes
+ the collision token). Per catalogue size it reports:

- trie build time and memory (the CSR prefix trie of ``train/models/beam_search.py``),
- users/s of constrained beam search (model + trie, decoder KV cache), of the same search recomputing
  every prefix (no cache; must return the same items), and of unconstrained beam search with the same
  model (the reference without the trie) and its invalid-ID rate,
- users/s of the constrained search alone, with fixed random logits in place of the model, which
  isolates the trie's cost per step.

Times are the median over ``--batches`` batches after one warm-up batch; ``cpu users/s`` uses the
process CPU time, which is the compute cost even when other processes share the machine.

    .venv/bin/python benchmarks/tiger_decode_bench.py            # 10^3 .. 10^6 items
    .venv/bin/python benchmarks/tiger_decode_bench.py --quick    # 10^3 and 10^5 only, 2 batches

Writes ``benchmarks/results/tiger_decode_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from data_pipeline.semantic_ids.table import add_collision_token  # noqa: E402
from train.models.beam_search import SemanticIdTrie, beam_search  # noqa: E402
from train.models.tiger import Tiger, TigerConfig, TigerVocab, encoder_input_ids, make_step_fn  # noqa: E402


def synthetic_codes(num_items: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """3 uniform random levels of 256 codes + the collision token: unique tuples."""
    rng = np.random.default_rng(seed)
    codes_NL, _ = add_collision_token(rng.integers(0, 256, size=(num_items, 3)))
    return codes_NL, [256, 256, 256, int(codes_NL[:, 3].max()) + 1]


def timed(fn, num_batches: int) -> tuple[float, float, object]:
    """Median wall and CPU seconds per call over ``num_batches`` calls after one warm-up call."""
    out = fn()
    walls, cpus = [], []
    for _ in range(num_batches):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus), out


def run_size(num_items: int, args, cfg: TigerConfig) -> dict:
    codes_NL, sizes = synthetic_codes(num_items, seed=args.seed)
    t0 = time.perf_counter()
    trie = SemanticIdTrie.from_codes(codes_NL, sizes)
    build_s = time.perf_counter() - t0
    torch.manual_seed(args.seed)
    model = Tiger(cfg, sizes).eval()
    vocab = TigerVocab(tuple(sizes), cfg.num_user_buckets)
    embedding = nn.Embedding(vocab.vocab_size, cfg.d_model)
    b, k = args.batch_size, args.beam_size
    g = torch.Generator().manual_seed(args.seed)
    offsets = torch.arange(b + 1) * cfg.max_history_items
    history = torch.randint(0, num_items, (b * cfg.max_history_items,), generator=g)
    buckets = torch.randint(0, cfg.num_user_buckets, (b,), generator=g)
    enc_ids, enc_mask = encoder_input_ids(
        buckets, history, offsets, torch.as_tensor(codes_NL), vocab, cfg.max_history_items
    )

    def decode(constrained: bool, use_cache: bool = True):
        with torch.no_grad():
            state = model.encode(embedding(enc_ids), enc_mask)
            step = make_step_fn(model, state, embedding, vocab, use_cache=use_cache)
            return beam_search(step, trie, b, k, len(sizes), constrained=constrained)

    fixed_logits = [torch.randn(b, k, v, generator=g) for v in sizes]

    def search_only():
        return beam_search(
            lambda level, p, parent: fixed_logits[level][:, : p.shape[1]], trie, b, k, len(sizes)
        )

    con_wall, con_cpu, con = timed(lambda: decode(True), args.batches)
    nocache_wall, nocache_cpu, nocache = timed(lambda: decode(True, use_cache=False), args.batches)
    assert torch.equal(nocache.item_index_BK, con.item_index_BK), "the decoder cache changed the result"
    free_wall, free_cpu, free = timed(lambda: decode(False), args.batches)
    search_wall, search_cpu, _ = timed(search_only, args.batches)
    assert (con.item_index_BK >= 0).all(), "constrained search returned a non-item"
    return {
        "num_items": num_items,
        "codebook_sizes": sizes,
        "trie_nodes_per_level": trie.nodes_per_level,
        "trie_build_s": build_s,
        "trie_mb": trie.memory_bytes() / 2**20,
        "constrained_users_per_s": b / con_wall,
        "constrained_cpu_users_per_s": b / con_cpu,
        "constrained_no_cache_users_per_s": b / nocache_wall,
        "constrained_no_cache_cpu_users_per_s": b / nocache_cpu,
        "unconstrained_users_per_s": b / free_wall,
        "unconstrained_cpu_users_per_s": b / free_cpu,
        "unconstrained_invalid_rate": free.invalid_rate,
        "search_only_users_per_s": b / search_wall,
        "search_only_cpu_users_per_s": b / search_cpu,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10**3, 10**4, 10**5, 10**6])
    parser.add_argument("--quick", action="store_true", help="sizes 10^3 and 10^5, 2 batches")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--beam-size", type=int, default=20)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=PROJECT_ROOT / "benchmarks" / "results" / "tiger_decode_bench.json"
    )
    args = parser.parse_args()
    if args.quick:
        args.sizes, args.batches = [10**3, 10**5], 2
    torch.set_num_threads(args.threads)
    cfg = TigerConfig(dropout=0.0, beam_size=args.beam_size)
    rows = []
    header = (
        f"{'items':>9} {'build s':>8} {'trie MB':>8} {'constr u/s':>11} {'(cpu)':>8} {'no-cache u/s':>13} "
        f"{'(cpu)':>8} {'unconstr u/s':>13} "
        f"{'(cpu)':>8} {'invalid':>8} {'search-only u/s':>16}"
    )
    print(
        f"TIGER decode, paper model, batch {args.batch_size}, beam {args.beam_size}, {args.threads} thread(s)"
    )
    print(header)
    for n in args.sizes:
        r = run_size(n, args, cfg)
        rows.append(r)
        print(
            f"{n:>9,} {r['trie_build_s']:>8.2f} {r['trie_mb']:>8.1f} {r['constrained_users_per_s']:>11.1f} "
            f"{r['constrained_cpu_users_per_s']:>8.1f} {r['constrained_no_cache_users_per_s']:>13.1f} "
            f"{r['constrained_no_cache_cpu_users_per_s']:>8.1f} {r['unconstrained_users_per_s']:>13.1f} "
            f"{r['unconstrained_cpu_users_per_s']:>8.1f} {r['unconstrained_invalid_rate']:>8.3f} "
            f"{r['search_only_users_per_s']:>16.0f}",
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    summary = {
        "batch_size": args.batch_size,
        "beam_size": args.beam_size,
        "threads": args.threads,
        "batches": args.batches,
        "model": vars(cfg),
        "torch": torch.__version__,
        "results": rows,
    }
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
