"""Optimizer and learning-rate schedule. The schedule is a pure function of the step, so resuming needs no
scheduler state and every strategy sets the same lr the same way."""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch


FUSED_DEVICE_TYPES = ("cuda", "cpu", "xpu", "mps", "hpu")  # torch's fused AdamW kernels


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float, no_decay: Sequence[str]) -> list[dict]:
    """Split parameters into decayed and not decayed (names containing any of `no_decay`, and all 1-D tensors).

    The shape is the parameter's full one: under ZeRO-3 (`zero.Init`) every local tensor is an empty 1-D
    placeholder, and reading its `ndim` would exempt every weight from decay."""
    decay, keep = [], []
    for name, param in named_params:
        if not param.requires_grad:
            continue
        lowered = name.lower()
        if len(getattr(param, "ds_shape", param.shape)) < 2 or any(pattern in lowered for pattern in no_decay):
            keep.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(
    params: Iterable[tuple[str, torch.nn.Parameter]],
    lr: float = 2e-5,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    no_decay: Sequence[str] = ("bias", "norm"),
    fused: str | bool = "auto",
) -> torch.optim.AdamW:
    """AdamW over named parameters: the fused kernel wherever torch has one (`fused=auto`: CUDA and CPU among
    others), else foreach. Same steps either way (tests/unit/test_fast_paths.py)."""
    named = list(params)
    groups = param_groups(named, weight_decay, no_decay)
    trainable = [p for _, p in named if p.requires_grad]  # frozen weights (LoRA's base) never reach the optimizer
    fusable = bool(trainable) and all(p.device.type in FUSED_DEVICE_TYPES and p.is_floating_point() for p in trainable)
    use_fused = fusable if fused == "auto" else bool(fused)
    kwargs = {"fused": True} if use_fused else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, **kwargs)


def warmup_steps_for(total_steps: int, warmup_ratio: float, warmup_steps: int) -> int:
    """Warmup length: explicit steps if > 0, else ceil(ratio x total) (as the HF Trainer computes it)."""
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * total_steps)


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup: int, name: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from 0, then cosine / linear / constant."""
    if warmup > 0 and step < warmup:
        return base_lr * step / warmup
    if name == "constant":
        return base_lr
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if name == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif name == "linear":
        factor = 1.0 - progress
    else:
        raise ValueError(f"scheduler.name={name!r}: expected cosine, linear or constant")
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * factor)
