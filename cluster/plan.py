"""Choose a training schedule that fits the GPU: sharding, ZeRO, offload, checkpointing, token budget.

    python -m cluster plan --config configs/hstu_large_ml1m.yaml --gpu-memory 80GiB \\
        --gpus-per-node 8 --nodes 4 --json runs/plan.json [key=value ...]

For every candidate schedule (TorchRec sharding type x ZeRO stage 0-3 x optimizer / parameter
offload x activation checkpointing, where the family supports it, x gradient accumulation) the
memory model (``cluster/memory.py``, the family's terms from its task) predicts the per-rank peak,
with its margin, for the worst batch the token budget admits; the candidates that fit the GPU are
ranked by a throughput estimate and the fastest wins. The chosen schedule is a list of config overrides (``Plan.overrides``).

Global batch. The configured ``data.batch_size`` rows hold ``batch_size x mean input length``
tokens (the mean from the data's manifest, else ``max_seq_len``). With accumulation A over W ranks
each rank's micro-step takes a token budget ``ceil(batch tokens / (W A))`` (``data.batching=tokens``,
``data.max_tokens_per_rank``), so an optimizer step sees the configured batch. The budget must hold
two of the longest rows (``train/token_batching.py``); when it cannot, the global batch grows to
that and the plan says so. The attention-cost budget is set to ``tokens x max_seq_len`` (the worst
case of rows at the longest length), the bound the memory model assumes.

Cost model (seconds per optimizer step, documented so that its choices can be checked):

- compute per micro-step: the family's FLOPs (``FamilyMemory.step_flops``; for HSTU / SASRec
  ``6 P_layers T + 6 L (E + F) S + 6 T C D``: matmuls forward and backward, attention over the
  padded pairs S, the loss over C negatives; TIGER's in ``train/tasks/tiger.py``) at
  ``gpu_flops x mfu``; checkpointing re-runs the forward (x 4/3); plus ``step_overhead_s`` per
  micro-step (launches, the host), which is what makes fewer, larger micro-steps cheaper;
- embedding lookup per micro-step: model-parallel tables move each looked-up row (width x 4
  bytes) forward and its gradient back through an all-to-all; the share that leaves the node goes
  at the inter-node bandwidth, the rest over NVLink. table_wise sends everything to the one rank
  that holds the table (its link is the bottleneck); data_parallel has no lookup traffic but
  all-reduces the table's dense gradient every micro-step;
- dense gradients per optimizer step: ring all-reduce (stages 0-1) / reduce-scatter (2-3) of
  ``w P`` bytes; stage 3 also all-gathers the parameters in forward and backward of every micro-step;
- offload: the partition's gradients and parameters cross PCIe each step, and the CPU runs AdamW
  over the partition at ``cpu_adam_params_per_s``; parameter offload moves the parameters in every
  micro-step.

When nothing fits, ``Plan.fits`` is False and ``Plan.explain`` names the largest term, by how much
the closest candidate is over, and what would fit (a larger GPU, more nodes).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from cluster.memory import (
    DTYPE_BYTES,
    MARGIN_FIXED_BYTES,
    MARGIN_FRACTION,
    SHARDING_TYPES,
    BatchShape,
    FamilyMemory,
    GiB,
    MemoryEstimate,
    estimate_memory,
    family_memory,
    fmt_bytes,
    stored_width,
)

ACCUMULATION_STEPS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ClusterSpec:
    """The machines: memory per GPU and how many GPUs, plus the speeds the cost model uses."""

    gpu_memory_bytes: int
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_flops: float = 400e12  # dense bf16 FLOP/s of one GPU (H100 SXM ~ 990e12 peak; A100 312e12)
    mfu: float = 0.35  # the share of it a recommender step reaches
    intra_node_bytes_per_s: float = 300e9  # NVLink per GPU
    inter_node_bytes_per_s: float = 50e9  # network per GPU (400 Gb/s)
    pcie_bytes_per_s: float = 25e9
    cpu_adam_params_per_s: float = 1e9
    step_overhead_s: float = 0.004  # per micro-step
    precision: str = "bf16"  # the dense model's (DeepSpeed bf16 on GPUs that have it)
    device_type: str = "cuda"  # "cpu": the memory model's CPU kernels (math attention, float dropout masks)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes


@dataclass(frozen=True)
class Schedule:
    """One candidate: what the plan sets."""

    sharding_type: str
    zero_stage: int
    offload_optimizer: bool
    offload_params: bool
    checkpointing: bool
    grad_accum_steps: int
    max_tokens_per_rank: int
    max_attention_cost_per_rank: int


@dataclass
class Plan:
    """The chosen schedule (or the closest miss), its memory by term and its cost estimate."""

    fits: bool
    schedule: Schedule
    memory: MemoryEstimate
    gpu_memory_bytes: int
    step_seconds: float
    tokens_per_step: int
    world_size: int
    num_candidates: int
    num_fitting: int
    memory_cap_gib: float
    notes: list[str] = field(default_factory=list)
    explain: str = ""

    @property
    def headroom_bytes(self) -> int:
        return self.gpu_memory_bytes - self.memory.with_margin

    @property
    def overrides(self) -> list[str]:
        """``key=value`` overrides that apply the schedule to the training config."""
        s = self.schedule
        return [
            f"embeddings.sharding_type={s.sharding_type}",
            f"embeddings.memory_cap_gib={self.memory_cap_gib:.2f}",
            f"zero.stage={s.zero_stage}",
            f"zero.offload_optimizer={str(s.offload_optimizer).lower()}",
            f"zero.offload_params={str(s.offload_params).lower()}",
            f"optim.grad_accum_steps={s.grad_accum_steps}",
            "data.batching=tokens",
            f"data.max_tokens_per_rank={s.max_tokens_per_rank}",
            f"data.max_attention_cost_per_rank={s.max_attention_cost_per_rank}",
            f"schedule.activation_checkpointing={str(s.checkpointing).lower()}",
        ]

    def to_dict(self) -> dict:
        return {
            "fits": self.fits,
            "schedule": dataclasses.asdict(self.schedule),
            "activation_checkpointing": self.schedule.checkpointing,
            "overrides": self.overrides,
            "memory_terms_bytes": dict(self.memory.terms),
            "total_bytes": self.memory.total,
            "margin_bytes": self.memory.margin,
            "predicted_peak_bytes": self.memory.with_margin,
            "gpu_memory_bytes": self.gpu_memory_bytes,
            "headroom_bytes": self.headroom_bytes,
            "step_seconds": self.step_seconds,
            "tokens_per_step": self.tokens_per_step,
            "tokens_per_second": self.tokens_per_step / self.step_seconds,
            "world_size": self.world_size,
            "candidates": self.num_candidates,
            "fitting_candidates": self.num_fitting,
            "notes": self.notes,
            "explain": self.explain,
        }

    def table(self) -> str:
        """A readable summary: each term, the choices, the headroom."""
        s = self.schedule
        lines = [
            f"{'fits' if self.fits else 'DOES NOT FIT'}: {fmt_bytes(self.memory.with_margin)} predicted peak "
            f"of {fmt_bytes(self.gpu_memory_bytes)} per GPU, {self.world_size} GPUs "
            f"({self.num_fitting} of {self.num_candidates} candidate schedules fit)",
            "",
            f"{'term':<22}{'per rank':>14}",
        ]
        for name, value in self.memory.terms.items():
            lines.append(f"{name:<22}{fmt_bytes(value):>14}")
        lines += [
            f"{'sum':<22}{fmt_bytes(self.memory.total):>14}",
            f"{'margin':<22}{fmt_bytes(self.memory.margin):>14}   "
            f"({MARGIN_FRACTION:.0%} + {fmt_bytes(MARGIN_FIXED_BYTES)}: allocator, CUDA context, NCCL)",
            f"{'predicted peak':<22}{fmt_bytes(self.memory.with_margin):>14}",
            f"{'headroom':<22}{fmt_bytes(self.headroom_bytes):>14}",
            "",
            f"sharding {s.sharding_type} (planner cap {self.memory_cap_gib:.2f} GiB), ZeRO stage {s.zero_stage}, "
            f"offload optimizer {s.offload_optimizer}, offload params {s.offload_params}, "
            f"activation checkpointing {s.checkpointing}",
            f"per rank: {s.max_tokens_per_rank} tokens, attention cost {s.max_attention_cost_per_rank}; "
            f"grad accumulation {s.grad_accum_steps}; {self.tokens_per_step} tokens per optimizer step",
            f"estimated {self.step_seconds * 1e3:.1f} ms per optimizer step, "
            f"{self.tokens_per_step / self.step_seconds:,.0f} tokens/s",
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.explain:
            lines += ["", self.explain]
        lines += ["", "overrides: " + " ".join(self.overrides)]
        return "\n".join(lines)


def data_stats(cfg) -> tuple[int | None, float | None, bool]:
    """(num_items, mean stored row length, has timestamps) from the data's manifest; without one
    (None, None, True): timestamps are assumed, which makes HSTU's time-bias index count."""
    path = Path(cfg.data.dir) / "manifest.json"
    if not path.is_file():
        return None, None, True
    manifest = json.loads(path.read_text())
    split = manifest.get("splits", {}).get("valid" if cfg.data.train_split == "train_valid" else "train", {})
    rows, items = split.get("num_rows"), split.get("num_interactions")
    mean = items / rows if rows and items else None
    return manifest.get("num_items"), mean, bool(manifest.get("has_timestamps", True))


def _compute_seconds(family: FamilyMemory, sched: Schedule, batch: BatchShape, cluster: ClusterSpec,
                     num_items: int) -> float:  # fmt: skip
    flops = family.step_flops(batch, num_items)
    if sched.checkpointing:
        flops *= 4 / 3
    return flops / (cluster.gpu_flops * cluster.mfu) + cluster.step_overhead_s


def _lookup_seconds(family: FamilyMemory, sched: Schedule, batch: BatchShape, cluster: ClusterSpec,
                    num_items: int) -> float:  # fmt: skip
    table_rows, dim = family.table_shape(num_items)
    width = stored_width(dim)
    world, local = cluster.world_size, cluster.gpus_per_node
    if sched.sharding_type == "data_parallel":
        table = table_rows * width * 4
        return 2 * table * (world - 1) / world / _ring_bandwidth(cluster)
    rows = family.lookup_rows(batch, num_items)
    moved = 2 * rows * width * 4  # rows forward, gradients back
    remote = (world - local) / world
    seconds = (
        moved * remote / cluster.inter_node_bytes_per_s
        + moved * (1 - remote) / cluster.intra_node_bytes_per_s
    )
    if sched.sharding_type == "table_wise":
        seconds *= world  # every rank's rows go through the one rank that holds the table
    return seconds


def _ring_bandwidth(cluster: ClusterSpec) -> float:
    return cluster.inter_node_bytes_per_s if cluster.nodes > 1 else cluster.intra_node_bytes_per_s


def step_seconds(
    cfg, sched: Schedule, batch: BatchShape, cluster: ClusterSpec, num_items: int,
    family: FamilyMemory | None = None,
) -> float:  # fmt: skip
    """The cost model of the module docstring: seconds per optimizer step."""
    family = family or family_memory(cfg)
    p, n = family.num_params(), cluster.world_size
    w = DTYPE_BYTES[cluster.precision]
    micro = _compute_seconds(family, sched, batch, cluster, num_items)
    micro += _lookup_seconds(family, sched, batch, cluster, num_items)
    ring = _ring_bandwidth(cluster)
    if sched.zero_stage == 3:
        micro += 2 * w * p * (n - 1) / n / ring  # parameter all-gathers, forward and backward
    if sched.offload_params:
        micro += 2 * w * p / n / cluster.pcie_bytes_per_s
    total = sched.grad_accum_steps * micro
    total += 2 * w * p * (n - 1) / n / ring  # gradient all-reduce / reduce-scatter
    if sched.offload_optimizer:
        total += (4 + w) * p / n / cluster.pcie_bytes_per_s + p / n / cluster.cpu_adam_params_per_s
    return total


def candidates(cfg, family: FamilyMemory | None = None) -> list[tuple[str, int, bool, bool, bool]]:
    """(sharding, stage, offload optimizer, offload params, checkpointing) combinations to try
    (checkpointing only for families that support it)."""
    family = family or family_memory(cfg)
    checkpointing = (False, True) if family.supports_checkpointing else (False,)
    out = []
    for sharding in SHARDING_TYPES:
        for stage in (0, 1, 2, 3):
            offloads = (
                [(False, False)]
                + ([(True, False)] if stage >= 1 else [])
                + ([(True, True)] if stage == 3 else [])
            )
            for off_opt, off_par in offloads:
                for ckpt in checkpointing:
                    out.append((sharding, stage, off_opt, off_par, ckpt))
    return out


def plan_schedule(
    cfg,
    cluster: ClusterSpec,
    num_items: int | None = None,
    mean_row_len: float | None = None,
    explain: bool = True,
) -> Plan:
    """The fastest schedule that fits ``cluster`` (see the module docstring), or the closest miss
    (with ``Plan.explain`` when ``explain``)."""
    family = family_memory(cfg)
    manifest_items, manifest_mean, has_timestamps = data_stats(cfg)
    num_items = num_items or manifest_items
    if num_items is None:
        raise ValueError(
            f"the number of items is unknown: {cfg.data.dir}/manifest.json is absent; prepare the data "
            "first or pass --num-items N"
        )
    source = (
        "given" if mean_row_len else ("from the manifest" if manifest_mean else "assumed: max_seq_len + 1")
    )
    mean_row_len = mean_row_len or manifest_mean or float(family.max_seq_len + 1)
    mean_input = max(1.0, min(mean_row_len, family.max_seq_len + 1) - 1)
    world = cluster.world_size
    global_tokens = int(math.ceil(cfg.data.batch_size * mean_input))
    longest = family.max_seq_len + 1
    notes = [
        f"global batch {cfg.data.batch_size} rows x {mean_input:.1f} mean input length = {global_tokens} tokens "
        f"(mean row length {mean_row_len:.1f}, {source})"
    ]
    scored: list[tuple[float, Schedule, MemoryEstimate, int]] = []
    misses: list[tuple[int, Schedule, MemoryEstimate]] = []
    count = 0
    for accum in ACCUMULATION_STEPS:
        tokens = max(2 * longest, math.ceil(global_tokens / (world * accum)))
        if accum > 1 and tokens == 2 * longest and global_tokens / (world * (accum // 2)) <= 2 * longest:
            continue  # no smaller micro-batch than the previous accumulation: pointless
        cost = tokens * family.max_seq_len
        batch = family.batch_bound(tokens, cost)
        for sharding, stage, off_opt, off_par, ckpt in candidates(cfg, family):
            sched = Schedule(sharding, stage, off_opt, off_par, ckpt, accum, tokens, cost)
            trial = dataclasses.replace(
                cfg,
                embeddings=dataclasses.replace(cfg.embeddings, sharding_type=sharding),
                zero=dataclasses.replace(
                    cfg.zero, stage=stage, offload_optimizer=off_opt, offload_params=off_par
                ),
            )
            est = estimate_memory(trial, world_size=world, local_world_size=cluster.gpus_per_node,
                                  num_items=num_items, batch=batch, checkpointing=ckpt, has_timestamps=has_timestamps,
                                  precision=cluster.precision, device_type=cluster.device_type, family=family)  # fmt: skip
            count += 1
            if est.with_margin <= cluster.gpu_memory_bytes:
                scored.append(
                    (step_seconds(trial, sched, batch, cluster, num_items, family), sched, est, tokens)
                )
            else:
                misses.append((est.with_margin, sched, est))
    if scored:
        seconds, sched, est, tokens = min(scored, key=lambda x: (x[0], x[1].grad_accum_steps))
        tokens_per_step = tokens * world * sched.grad_accum_steps
        if tokens_per_step > 1.05 * global_tokens:
            notes.append(
                f"the token budget must hold two rows of {longest} items, so a step takes {tokens_per_step} tokens, "
                f"more than the configured {global_tokens}"
            )
        cap = _planner_cap(est, cluster)
        return Plan(True, sched, est, cluster.gpu_memory_bytes, seconds, tokens_per_step, world, count,
                    len(scored), cap, notes)  # fmt: skip
    peak, sched, est = min(misses, key=lambda x: x[0])
    tokens_per_step = sched.max_tokens_per_rank * world * sched.grad_accum_steps
    trial_cfg = dataclasses.replace(
        cfg,
        embeddings=dataclasses.replace(cfg.embeddings, sharding_type=sched.sharding_type),
        zero=dataclasses.replace(cfg.zero, stage=sched.zero_stage, offload_optimizer=sched.offload_optimizer,
                                 offload_params=sched.offload_params),
    )  # fmt: skip
    batch = family.batch_bound(sched.max_tokens_per_rank, sched.max_attention_cost_per_rank)
    seconds = step_seconds(trial_cfg, sched, batch, cluster, num_items, family)
    plan = Plan(False, sched, est, cluster.gpu_memory_bytes, seconds, tokens_per_step, world, count, 0,
                _planner_cap(est, cluster), notes)  # fmt: skip
    if explain:
        plan.explain = _explain_miss(cfg, cluster, plan, num_items, mean_row_len)
    return plan


def _planner_cap(est: MemoryEstimate, cluster: ClusterSpec) -> float:
    """The TorchRec planner's per-device cap: the GPU minus everything but the table's own terms."""
    table = est.terms["embedding_weights"] + est.terms["embedding_optimizer"] + est.terms["embedding_grads"]
    rest = est.with_margin - table
    return max(0.0, (cluster.gpu_memory_bytes - rest) / GiB)


def _explain_miss(cfg, cluster: ClusterSpec, plan: Plan, num_items: int, mean_row_len: float) -> str:
    name, value = plan.memory.largest_term()
    over = plan.memory.with_margin - cluster.gpu_memory_bytes
    lines = [
        f"No schedule fits {fmt_bytes(cluster.gpu_memory_bytes)} per GPU on {cluster.world_size} GPUs. The closest "
        f"(above) needs {fmt_bytes(plan.memory.with_margin)}, {fmt_bytes(over)} over; its largest term is "
        f"{name} = {fmt_bytes(value)}."
    ]
    for nodes in (2, 4, 8, 16, 32, 64, 128, 256):
        bigger = dataclasses.replace(cluster, nodes=cluster.nodes * nodes)
        trial = plan_schedule(cfg, bigger, num_items, mean_row_len, explain=False)
        if trial.fits:
            lines.append(
                f"What fits: {bigger.nodes} nodes ({bigger.world_size} GPUs), e.g. {trial.schedule.sharding_type} "
                f"with ZeRO {trial.schedule.zero_stage} (predicted {fmt_bytes(trial.memory.with_margin)}),"
            )
            break
    needed = plan.memory.with_margin
    lines.append(f"or GPUs with >= {fmt_bytes(needed)} each for the closest schedule.")
    if name in ("embedding_weights", "embedding_optimizer"):
        lines.append(
            "The item table dominates: a row_wise / column_wise table shrinks with more ranks; "
            "embeddings.optimizer=rowwise_adagrad keeps one value per row instead of adam's two tables."
        )
    elif name in ("attention", "activations", "loss"):
        lines.append(
            "The batch's activations dominate even at the smallest token budget (two rows of max_seq_len): "
            "lower model.max_seq_len, or loss.num_negatives / loss.negatives=shared for the loss."
        )
    return "\n".join(lines)


def plan_main(args) -> int:
    """``python -m cluster plan``: load the config, plan, print the table, write the JSON."""
    from cluster.memory import parse_bytes
    from train.config import load_train_config

    cfg = load_train_config(args.config, args.overrides)
    cluster = ClusterSpec(parse_bytes(args.gpu_memory), args.gpus_per_node, args.nodes)
    plan = plan_schedule(cfg, cluster, args.num_items, args.mean_row_len)
    print(plan.table())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0 if plan.fits else 2


def add_plan_parser(subparsers) -> None:
    """The ``plan`` subcommand of ``python -m cluster``."""
    p = subparsers.add_parser("plan", help="choose a schedule that fits the GPUs (cluster/plan.py)")
    p.add_argument("--config", required=True, help="training config YAML (configs/*.yaml)")
    p.add_argument("--gpu-memory", required=True, help="memory per GPU, e.g. 80GiB, 40GiB, 24GiB")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--num-items", type=int, default=None, help="items in the catalog (default: the manifest)")
    p.add_argument(
        "--mean-row-len", type=float, default=None, help="mean stored row length (default: manifest)"
    )
    p.add_argument("--json", default=None, help="write the plan as JSON here")
    p.add_argument("overrides", nargs="*", help="key.sub=value config overrides")
    p.set_defaults(func=plan_main)
