"""Data-parallel wrapping: none (no wrapper at all), DDP (+ comm hooks), or FSDP2 (`fully_shard`)
in three flavours: zero2 (parameters stay gathered from forward to backward), fsdp (gathered per
block, just in time) and hsdp (fsdp within shard groups, replicated across them)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.config.schema import SHARDED, ParallelConfig, PrecisionConfig
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.protocol import fsdp_units
from dist_train.parallel.precision import DTYPES


def resolve_strategy(cfg: ParallelConfig, world_size: int) -> str:
    if cfg.strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if cfg.strategy == "none" and world_size > 1:
        raise ConfigError(
            "parallel.strategy",
            cfg.strategy,
            f"world size is {world_size}; gradients must be synchronized "
            f"(ddp, {', '.join(SHARDED)})",
        )
    if cfg.strategy in SHARDED and world_size == 1:
        raise ConfigError(
            "parallel.strategy",
            cfg.strategy,
            f"{cfg.strategy} shards over workers and needs world_size > 1 (use none)",
        )
    return cfg.strategy


def shard_group_size(cfg: ParallelConfig, world_size: int, local_world_size: int) -> int:
    """Ranks that each parameter, gradient and optimizer state is split over: every rank under
    zero2 and fsdp, `parallel.shard_size` (default: one node's workers) under hsdp, none (1)
    under ddp. HSDP's shard groups are consecutive ranks, so they stay within a node."""
    strategy = resolve_strategy(cfg, world_size)
    if strategy != "hsdp":
        return world_size if strategy in SHARDED else 1
    size = cfg.shard_size or local_world_size
    if world_size % size:
        raise ConfigError(
            "parallel.shard_size",
            size,
            f"must divide the world size {world_size} (hsdp: world_size / shard_size "
            "replicas of shard_size ranks each)",
        )
    return size


def wrap_model(
    model: nn.Module, cfg: ParallelConfig, precision: PrecisionConfig, env: DistEnv
) -> nn.Module:
    """Move to the run's device and wrap for data parallelism. Every rank built the model from
    the same seed; DDP also broadcasts rank 0's parameters, FSDP shards the identical copies."""
    strategy = resolve_strategy(cfg, env.world_size)
    if strategy in SHARDED:
        return _shard(model.to(env.device), cfg, precision, env)
    model = model.to(env.device)
    if strategy == "none":
        return model
    ddp = DDP(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb=cfg.bucket_cap_mb,
        static_graph=cfg.static_graph,
    )
    _register_comm_hook(ddp, cfg)
    return ddp


def _register_comm_hook(ddp: DDP, cfg: ParallelConfig) -> None:
    """PyTorch's built-in hooks: compress gradients for the all-reduce, or low-rank PowerSGD."""
    if cfg.grad_compression == "bf16":
        ddp.register_comm_hook(None, _bf16_hook)
    elif cfg.grad_compression == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif cfg.grad_compression == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None,
            matrix_approximation_rank=cfg.powersgd_rank,
            start_powerSGD_iter=max(2, cfg.powersgd_start_step),
        )
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)


def _bf16_hook(state, bucket):  # type: ignore[no-untyped-def]
    """PyTorch's bf16_compress_hook under another name: DDP refuses that name unless on
    NCCL >= 2.10 (older NCCL lacked bf16), but gloo all-reduces bf16 fine (tested on CPU).
    Unannotated on purpose: DDP checks the hook's annotations against the real classes, and
    this module's postponed (string) annotations would fail that check."""
    return default_hooks.bf16_compress_hook(state, bucket)


def _shard(
    model: nn.Module, cfg: ParallelConfig, precision: PrecisionConfig, env: DistEnv
) -> nn.Module:
    """FSDP2 per block (`protocol.fsdp_units`: GPT's transformer blocks, a transformers model's
    `_no_split_modules`; none: the root only), then the root. The mesh is built for the run's
    own device: a CPU/gloo run stays on CPU even on a GPU box."""
    strategy = resolve_strategy(cfg, env.world_size)
    options: dict[str, Any] = {
        "mesh": shard_mesh(cfg, env),
        "mp_policy": MixedPrecisionPolicy(
            param_dtype=DTYPES[precision.dtype], reduce_dtype=DTYPES[precision.reduce_dtype]
        ),
        # Pinned host memory needs an accelerator; on a CPU run there is nothing to move anyway.
        "offload_policy": CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
        if cfg.cpu_offload
        else OffloadPolicy(),
    }
    # zero2 keeps each block's parameters gathered from its forward until its backward: no
    # second all-gather, full-size parameters at the peak. fsdp/hsdp free them after forward.
    reshard = cfg.reshard_after_forward and strategy != "zero2"
    for unit in fsdp_units(model):
        fully_shard(unit, reshard_after_forward=reshard, **options)
    # The root keeps the rest (embeddings, tied head); it is used right after the last block,
    # so resharding it after forward would only gather it again for backward.
    fully_shard(model, reshard_after_forward=False, **options)
    return model


def describe(cfg: ParallelConfig, world_size: int, local_world_size: int) -> str:
    """The strategy as the run summary says it: `hsdp (2 replicas x 2 shards), activation
    checkpointing full, cpu offload`."""
    strategy = resolve_strategy(cfg, world_size)
    parts = [strategy]
    if strategy in SHARDED:
        shard = shard_group_size(cfg, world_size, local_world_size)
        n = world_size // shard
        replicas = f"{n} replica{'s' if n > 1 else ''} x " if strategy == "hsdp" else ""
        parts[0] += f" ({replicas}{shard} shards)"
    if cfg.activation_checkpointing != "none":
        every = cfg.activation_checkpointing_every
        which = "every block" if cfg.activation_checkpointing == "full" else f"every {every} blocks"
        parts.append(f"activation checkpointing {which}")
    if cfg.cpu_offload:
        parts.append("cpu offload")
    return ", ".join(parts)


def shard_mesh(cfg: ParallelConfig, env: DistEnv) -> DeviceMesh:
    """1-D over every rank (zero2, fsdp), or 2-D (replicate, shard) for hsdp: FSDP2
    reduce-scatters gradients within a shard group and all-reduces them across replicas."""
    shard = shard_group_size(cfg, env.world_size, env.local_world_size)
    if resolve_strategy(cfg, env.world_size) != "hsdp":
        return init_device_mesh(env.device.type, (env.world_size,))
    return init_device_mesh(
        env.device.type,
        (env.world_size // shard, shard),
        mesh_dim_names=("replicate", "shard"),
    )


def settle_buckets(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    loss: Callable[[Any, torch.Tensor], torch.Tensor],
    autocast: AbstractContextManager[Any],
) -> None:
    """For a resumed run: DDP lays its gradient buckets out anew after its first backward (in
    the order gradients became ready), and gloo's all-reduce over more than two ranks sums an
    element in an order that depends on where it sits in a bucket. An uninterrupted run has
    that layout from its second step on; without this, a resumed run would reach it one step
    after resuming, and differ in the last bit. One forward and backward that leaves no trace
    (the RNG forked, buffers such as batch-norm statistics restored, gradients dropped) gives
    it the layout first. Compression hooks keep state of their own: not for them."""
    if not isinstance(model, DDP) or model.process_group.size() <= 2:
        return
    buffers = [b.detach().clone() for b in model.buffers()]
    devices = [batch[0].device] if batch[0].device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), autocast:
        out = loss(model(batch[0]), batch[1])
    out.backward()
    with torch.no_grad():
        for b, saved in zip(model.buffers(), buffers, strict=True):
            b.copy_(saved)
    model.zero_grad(set_to_none=True)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module (FSDP2 changes the module in place, so only DDP has a wrapper)."""
    return model.module if isinstance(model, DDP) else model


def grad_sync(
    model: nn.Module, enabled: bool, cfg: ParallelConfig | None = None
) -> AbstractContextManager[Any]:
    """Skip gradient communication on all but the last micro-batch of an accumulation. zero2
    also keeps the parameters gathered after those micro-batches' backward: the next
    micro-batch all-gathers nothing (they are at their peak size anyway under zero2)."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
        if cfg is not None and cfg.strategy == "zero2":
            model.set_reshard_after_backward(enabled)
        return nullcontext()
    if enabled or not isinstance(model, DDP):
        return nullcontext()
    return model.no_sync()


def local_numel(model: nn.Module) -> int:
    """Parameter elements this rank stores (its shards under FSDP2)."""
    return sum(
        p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters()
    )
