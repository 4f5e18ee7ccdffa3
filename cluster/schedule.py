"""``schedule=auto``: the hooks the trainer calls to run with a plan from ``cluster/plan.py``.

cfg, plan = apply_plan(cfg, cluster)          # before building anything
write_plan(plan, run_dir, tracker)            # plan.json in the run directory and in MLflow
if plan.schedule.checkpointing:
    enable_activation_checkpointing(encoder)  # before wrapping the encoder in DeepSpeed
...                                           # after the first steps (peak memory of the device):
warning = check_predicted_peak(plan, torch.cuda.max_memory_allocated())
if warning: logger.warning(warning)
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cluster.config import from_dict, merge, parse_overrides, to_dict
from cluster.memory import fmt_bytes
from cluster.plan import ClusterSpec, Plan, plan_schedule

# A measured peak more than this far from the prediction gets a warning.
PEAK_TOLERANCE = 0.15


def cluster_from_env(gpu_memory_bytes: int | None = None) -> ClusterSpec:
    """The cluster this process runs on: GPU memory from the device (or given), sizes from torchrun's env."""
    if gpu_memory_bytes is None:
        if not torch.cuda.is_available():
            raise ValueError(
                "schedule=auto needs the GPU memory: run on a CUDA device or pass the memory size"
            )
        gpu_memory_bytes = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return ClusterSpec(
        gpu_memory_bytes, gpus_per_node=local, nodes=max(1, world // max(1, local)), device_type=device_type
    )


def apply_plan(cfg, cluster: ClusterSpec, num_items: int | None = None):
    """Plan for ``cluster`` and return ``(cfg with the plan's overrides, plan)``.

    Raises ``ValueError`` with the plan's explanation when nothing fits. The returned config is a
    new, validated ``TrainConfig``; ``cfg`` is not modified.
    """
    plan = plan_schedule(cfg, cluster, num_items)
    if not plan.fits:
        raise ValueError("schedule=auto: " + plan.explain.replace("\n", " "))
    data = merge(to_dict(cfg), parse_overrides(plan.overrides))
    return from_dict(type(cfg), data), plan  # from_dict validates


def write_plan(plan: Plan, run_dir: str | os.PathLike, tracker=None) -> Path:
    """Write ``plan.json`` to the run directory and log it to the tracker (MLflow) if given."""
    path = Path(run_dir) / "plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plan.to_dict(), indent=2) + "\n")
    if tracker is not None:
        tracker.log_artifact(path)
        tracker.log_params({"schedule/" + k.split("=")[0]: k.split("=", 1)[1] for k in plan.overrides})
    return path


def check_predicted_peak(plan: Plan, measured_bytes: int, tolerance: float = PEAK_TOLERANCE) -> str | None:
    """A warning when the measured peak is above the plan's budget or far from its prediction, else None.

    Compares with the modelled sum (``max_memory_allocated`` excludes the CUDA context and the
    fragmentation the margin stands for).
    """
    predicted = plan.memory.total
    if measured_bytes > plan.gpu_memory_bytes - plan.memory.margin:
        return (
            f"measured peak {fmt_bytes(measured_bytes)} leaves less than the margin "
            f"({fmt_bytes(plan.memory.margin)}) of the {fmt_bytes(plan.gpu_memory_bytes)} GPU; the plan "
            f"predicted {fmt_bytes(predicted)}: lower data.max_tokens_per_rank or raise optim.grad_accum_steps"
        )
    error = (measured_bytes - predicted) / max(1, predicted)
    if abs(error) > tolerance:
        return (
            f"measured peak {fmt_bytes(measured_bytes)} is {error:+.0%} off the plan's {fmt_bytes(predicted)}; "
            "the memory model (cluster/memory.py) misses a term for this config: please report it"
        )
    return None


def enable_activation_checkpointing(encoder: torch.nn.Module) -> None:
    """Checkpoint every HSTU layer / SASRec or BERT4Rec block (each keeps only its input, recomputes
    the rest)."""
    from cluster.memory_measure import checkpoint_layers

    checkpoint_layers(encoder)
