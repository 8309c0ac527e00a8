"""Data-parallel wrapping: none (one worker, no wrapper at all) or DDP."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.config import ParallelConfig
from dist_train.env import DistEnv
from dist_train.errors import ConfigError


def resolve_strategy(cfg: ParallelConfig, world_size: int) -> str:
    if cfg.strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError("parallel.strategy", cfg.strategy,
                          f"world size is {world_size}; gradients must be synchronized (use ddp)")
    return cfg.strategy


def wrap_model(model: nn.Module, cfg: ParallelConfig, env: DistEnv) -> nn.Module:
    """Move to the run's device and wrap for data parallelism. DDP broadcasts rank 0's
    parameters on construction, so every rank starts from the same weights."""
    model = model.to(env.device)
    if resolve_strategy(cfg, env.world_size) == "none":
        return model
    return DDP(model, device_ids=[env.device.index] if env.device.type == "cuda" else None,
               bucket_cap_mb=cfg.bucket_cap_mb, static_graph=cfg.static_graph)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DDP) else model


def grad_sync(model: nn.Module, enabled: bool) -> AbstractContextManager[Any]:
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled or not isinstance(model, DDP):
        return nullcontext()
    return model.no_sync()
