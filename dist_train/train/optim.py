"""Optimizers and learning-rate schedules (pure functions of the step)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from dist_train.config.schema import OptimConfig


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Weight decay applies to matrices and embeddings only: decaying biases and norm gains
    only hurts. Frozen parameters are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def decay_horizon(cfg: OptimConfig, max_steps: int) -> int:
    """Steps the schedule spans: optim.decay_steps, or the run's max_steps when 0."""
    return cfg.decay_steps or max_steps


def lr_at(step: int, cfg: OptimConfig, decay_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine (reaching
    min_lr exactly at the last step, decay_steps - 1, and staying there) or constant."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    if cfg.schedule == "constant":
        return cfg.lr
    span = max(1, decay_steps - 1 - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_and_measure(model: nn.Module, max_norm: float, measure: bool) -> torch.Tensor | None:
    """Clip gradients by their global norm when `max_norm > 0`; return the (pre-clip) norm when
    clipping or when asked to measure, without a host sync either way. Under FSDP2 the
    gradients are sharded DTensors: their norm is reduced over ranks into the global one."""
    if max_norm <= 0 and not measure:
        return None
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm
