"""Optimizer and learning-rate schedule of every trainer: AdamW with warm-up and decay."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..config import OptimConfig


def fused_ok(params: list[torch.nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel applies: every parameter a floating-point CUDA tensor. The
    fused step updates all parameters in a few kernel launches instead of several per tensor
    (hundreds of tensors in a 2B model); on the CPU the plain loop stays (it always works)."""
    return bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D);
    fused when every parameter is on the GPU (:func:`fused_ok`). The update is the same AdamW:
    m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2, w -= lr (m_hat / (sqrt(v_hat) + eps) + wd w)."""
    params = [p for p in params if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused_ok(params) or None)


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based).

    Linear warm-up: (step + 1) / warmup for step < warmup. Then, with
    progress p = (step - warmup) / max(1, total - warmup):
    constant 1; linear 1 - p; cosine 0.5 (1 + cos(pi p)).
    """
    if step < warmup:
        return (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    return 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(opt: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` as a scheduler; warm-up steps from ``warmup_steps`` or ``warmup_ratio``."""
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total_steps, warmup, cfg.schedule))
