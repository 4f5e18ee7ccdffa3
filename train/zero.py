"""The dense side: the sequence encoder inside a DeepSpeed engine (ZeRO stage 0-3).

``deepspeed_config(cfg)`` generates DeepSpeed's JSON from our config (it is written to the run
directory and to MLflow); ``build_engine`` wraps the encoder. The LR schedule (linear warmup, then
constant, or held and then a cosine or linear decay over the last ``decay_fraction`` of the steps)
is a plain ``LambdaLR`` handed to DeepSpeed, so it is checkpointed with the engine. The trainer
gives the item table the same factor of its own LR after every step (``embeddings.schedule=dense``,
the default).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import deepspeed
import torch
from torch import nn
from torch.utils.cpp_extension import get_default_build_root

from train.config import TrainConfig


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    """``auto`` -> bf16 on CUDA devices that support it, else fp32."""
    if cfg.zero.precision != "auto":
        return cfg.zero.precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: TrainConfig, world_size: int, device: torch.device) -> dict:
    """DeepSpeed JSON for the dense encoder, derived from ``cfg`` only."""
    precision = resolve_precision(cfg, device)
    zero: dict = {"stage": cfg.zero.stage}
    if cfg.zero.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if cfg.zero.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    micro_batch = max(1, cfg.data.batch_size // world_size)
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.optim.grad_accum_steps,
        "train_batch_size": micro_batch * world_size * cfg.optim.grad_accum_steps,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": cfg.optim.lr,
                "betas": list(cfg.optim.betas),
                "eps": cfg.optim.eps,
                "weight_decay": cfg.optim.weight_decay,
                # torch's AdamW: no compiled DeepSpeed op needed, same maths on CPU and GPU.
                "torch_adam": True,
                "adam_w_mode": True,
            },
        },
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def lr_lambda(cfg: TrainConfig, total_steps: int):
    """Multiplier of the base LR at optimizer step ``s``: linear warmup, a flat stretch, then the decay.

    The decay takes the last ``decay_fraction`` of the steps after warmup and ends at ``min_lr_ratio``.
    """
    warmup, decay, floor = cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio
    decay_steps = cfg.optim.decay_fraction * (total_steps - warmup)
    decay_start = total_steps - decay_steps

    def fn(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if decay == "constant" or total_steps <= warmup or step <= decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1.0, decay_steps))
        if decay == "cosine":
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return floor + (1 - floor) * (1 - progress)

    return fn


STALE_LOCK_SECONDS = 600  # DeepSpeed's CPU ops build in about a minute here


def stale_build_locks(max_age_s: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Build locks of torch C++ extensions (DeepSpeed JIT-builds its ops there) older than ``max_age_s``.

    A process killed while it builds an op leaves ``<extensions dir>/<op>/lock``; every later build
    of that op waits on the file forever (``FileBaton.wait``), so the engine would hang, silently.
    """
    roots = [Path(get_default_build_root())]
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        roots.append(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
    now = time.time()
    locks = set()
    for root in roots:
        for pattern in ("*/lock", "*/*/lock"):
            locks.update(p for p in root.glob(pattern) if now - p.stat().st_mtime > max_age_s)
    return sorted(locks)


def build_engine(encoder: nn.Module, cfg: TrainConfig, ds_config: dict, total_steps: int):
    """Wrap ``encoder`` in a DeepSpeed engine; returns the engine (its optimizer and scheduler inside)."""
    if stale := stale_build_locks():
        minutes = (time.time() - stale[0].stat().st_mtime) / 60
        raise RuntimeError(
            f"stale build lock {stale[0]} ({minutes:.0f} min old; {len(stale)} in all): a process was killed "
            "while it built a DeepSpeed op, and DeepSpeed would wait on this file forever. If no build is "
            f"running, remove it (rm {' '.join(map(str, stale))}) and start again."
        )
    schedule = lr_lambda(cfg, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=encoder,
        model_parameters=[p for p in encoder.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        dist_init_required=False,
    )
    return engine
