"""Training contenders: dist_train's own hot path, and a minimal hand-written PyTorch loop that
does the same work (same model, batches, optimizer, schedule, clipping, precision, DDP buckets
or FSDP2 units and mixed-precision policy).
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.overrides import TorchFunctionMode

from dist_train.bench.by_hand import SHARDED_BY_HAND, checkpoint_by_hand, shard_by_hand
from dist_train.config.schema import RunConfig, accumulation_steps, micro_batch_size
from dist_train.data.datasets import Data
from dist_train.data.sampler import GlobalBatchSampler
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.registry import build_model
from dist_train.parallel.precision import DTYPES
from dist_train.parallel.wrap import resolve_strategy, unwrap
from dist_train.train.build import build_trainer
from dist_train.train.optim import decay_horizon, lr_at
from dist_train.train.trainer import Trainer


def check_plain_ddp(cfg: RunConfig, nproc: int) -> None:
    """The Accelerate loop uses plain DDP: another strategy or a compression hook in dist_train
    would turn the comparison into one of different work."""
    _check_plain(cfg, nproc, ("none", "ddp"), "use auto or ddp")


def check_hand_written(cfg: RunConfig, nproc: int) -> None:
    """The hand-written loop wraps with plain DDP or FSDP2 (zero2, fsdp, hsdp), without
    compression hooks."""
    _check_plain(
        cfg,
        nproc,
        ("none", "ddp", *SHARDED_BY_HAND),
        f"use auto, ddp, {', '.join(SHARDED_BY_HAND)}",
    )


def _check_plain(cfg: RunConfig, nproc: int, strategies: tuple[str, ...], use: str) -> None:
    strategy = resolve_strategy(cfg.parallel, nproc)
    if strategy not in strategies:
        raise ConfigError(
            "parallel.strategy",
            cfg.parallel.strategy,
            f"this benchmark compares plain {'/'.join(strategies[1:]).upper()} loops; {use}",
        )
    compression = getattr(cfg.parallel, "grad_compression", "none")
    if compression != "none":
        raise ConfigError(
            "parallel.grad_compression",
            compression,
            "this benchmark compares loops without compression hooks; use none",
        )


class FrameworkLoop:
    """The real thing: `Trainer.train_step` exactly as `fit` calls it on a step that does not
    log (`measure_norm=False`)."""

    def __init__(self, cfg: RunConfig, env: DistEnv) -> None:
        self.trainer: Trainer = build_trainer(cfg, env)
        self.trainer.model.train()
        self.step = 0

    @property
    def data(self) -> Data:
        return self.trainer.data

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.trainer.train_step(self.step, measure_norm=False)
            self.step += 1

    def parameters(self) -> list[torch.Tensor]:
        return list(unwrap(self.trainer.model).parameters())

    def close(self) -> None:
        self.trainer.close()


def raw_loss(logits: torch.Tensor, y: torch.Tensor, task: str) -> torch.Tensor:
    if task == "lm":
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return F.mse_loss(logits, y) if task == "regression" else F.cross_entropy(logits, y)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices and embeddings, not biases and norm gains (what nanoGPT does too)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def raw_optimizer(cfg: RunConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)


def rank_batches(cfg: RunConfig, env: DistEnv, data: Data, steps: int) -> list[torch.Tensor]:
    """This rank's sample indices for each step, the same as the framework's, computed before
    any timing: the raw loop pays nothing for choosing its data."""
    sampler = GlobalBatchSampler(len(data.train), cfg.train.global_batch_size, cfg.train.seed)
    return [sampler.rank_indices(s, env.rank, env.world_size).clone() for s in range(steps)]


class RawLoop:
    """What one writes by hand: model (same init), activation checkpointing of its blocks when
    the config asks, DDP with the same bucket size when there is more than one worker (FSDP2
    with `parallel.strategy` zero2, fsdp or hsdp), AdamW, autocast (+ GradScaler for fp16),
    clip, step, zero_grad."""

    def __init__(self, cfg: RunConfig, env: DistEnv, data: Data, steps: int) -> None:
        self.cfg, self.env, self.data = cfg, env, data
        torch.manual_seed(cfg.train.seed)  # the framework's initialization, hence its weights
        model = build_model(cfg.model, data.spec).to(env.device)
        checkpoint_by_hand(model, cfg)
        self.module = model
        self.model: nn.Module = model
        self.strategy = resolve_strategy(cfg.parallel, env.world_size)
        if self.strategy == "ddp":
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model = DDP(
                model,
                device_ids=ids,
                bucket_cap_mb=cfg.parallel.bucket_cap_mb,
                static_graph=cfg.parallel.static_graph,
            )
        elif self.strategy in SHARDED_BY_HAND:  # in place: model is sharded now
            self.model = shard_by_hand(model, self.strategy, cfg, env)
        self.optimizer = raw_optimizer(cfg, model)
        dtype = DTYPES[cfg.precision.dtype]
        self.autocast_dtype = None if dtype == torch.float32 else dtype
        self.scaler = torch.amp.GradScaler(env.device.type) if dtype == torch.float16 else None
        self.accum = accumulation_steps(cfg, env.world_size)
        self.micro = micro_batch_size(cfg, env.world_size)
        self.batches = rank_batches(cfg, env, data, steps)
        self.step = 0

    def _grad_sync(self, last: bool) -> AbstractContextManager[Any]:
        """Gradients are reduced across ranks on the last micro-batch of a step only."""
        if self.strategy in SHARDED_BY_HAND:
            self.model.set_requires_gradient_sync(last)  # type: ignore[operator]
        if self.strategy == "ddp" and not last:
            return self.model.no_sync()  # type: ignore[operator]
        return nullcontext()

    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.env.device.type, dtype=self.autocast_dtype)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.train.get_batch(idx)
        if self.env.device.type == "cuda":
            return (
                x.pin_memory().to(self.env.device, non_blocking=True),
                y.pin_memory().to(self.env.device, non_blocking=True),
            )
        return x, y

    def run(self, steps: int) -> None:
        cfg, model, opt, scaler = self.cfg, self.model, self.optimizer, self.scaler
        for _ in range(steps):
            lr = lr_at(
                self.step, cfg.optim, decay_horizon(cfg.optim, cfg.train.max_steps)
            )  # the same numbers, by hand
            for group in opt.param_groups:
                group["lr"] = lr
            chunks = self.batches[self.step].split(self.micro)
            for i, chunk in enumerate(chunks):
                x, y = self._load(chunk)
                last = i == len(chunks) - 1
                with self._grad_sync(last):
                    with self._autocast():
                        loss = raw_loss(model(x), y, self.data.spec.task)
                    if self.accum > 1:
                        loss = loss / self.accum
                    (scaler.scale(loss) if scaler else loss).backward()
            if scaler:
                scaler.unscale_(opt)
            if cfg.optim.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip, foreach=True)
            if scaler:
                scaler.step(opt)
                scaler.update()
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            self.step += 1

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def close(self) -> None:
        """Drop the DDP wrapper before the process group goes (see `Trainer.close`)."""
        self.model = self.module
        gc.collect()


def training_settings(cfg: RunConfig, env: DistEnv, loop: FrameworkLoop) -> dict[str, Any]:
    """What a training benchmark ran: enough to compare two result files."""
    return {
        "model": cfg.model._target_ or cfg.model.name,
        "parameters": sum(p.numel() for p in loop.parameters()),
        "world_size": env.world_size,
        "strategy": resolve_strategy(cfg.parallel, env.world_size),
        "device": str(env.device),
        "backend": env.backend,
        "precision": cfg.precision.dtype,
        "global_batch_size": cfg.train.global_batch_size,
        "micro_batch_size": micro_batch_size(cfg, env.world_size),
        "accumulation_steps": accumulation_steps(cfg, env.world_size),
        "bucket_cap_mb": cfg.parallel.bucket_cap_mb,
        "grad_clip": cfg.optim.grad_clip,
        "tokens_per_sample": loop.data.spec.tokens_per_sample,
    }


class _HostSyncCounter(TorchFunctionMode):
    """Counts Python-level reads of tensor values (`.item()`, `bool(t)`, ...); on a GPU, reading
    a device tensor waits for the device. (Adam's reads of its own CPU step counters show up in
    every contender alike; numpy views of index tensors for data loading are not counted.)"""

    READS = frozenset({"item", "tolist", "__bool__", "__float__", "__int__", "__index__"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in self.READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def count_host_syncs(run: Callable[[int], None]) -> int:
    """Value reads in one step of a contender (run untimed, after the measurement)."""
    with _HostSyncCounter() as counter:
        run(1)
    return counter.count


def max_param_diff(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor]) -> float:
    """Largest absolute difference between two models' parameters after the benchmark: near
    zero shows that the contenders did the same work, step for step."""
    diffs = [
        (x.detach().float() - y.detach().float()).abs().max().item()
        for x, y in zip(a, b, strict=True)
    ]
    return max(diffs, default=0.0)
