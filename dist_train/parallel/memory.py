"""What one rank holds at the peak of a training step, per strategy, estimated before any process
starts: parameters, gradients and optimizer state from the model's size and the sharding;
activations from one micro-batch's forward run on the meta device (no memory, no compute), so
the figure is the model's own, whatever its architecture. `bench strategies` holds these
estimates against measured peaks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_train.config.schema import SHARDED, ParallelConfig
from dist_train.models.protocol import fsdp_units
from dist_train.parallel.recompute import recomputed_units

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


@dataclass
class Activations:
    """Bytes autograd saves for backward in one micro-batch's forward: outside the blocks, inside
    each block, and each block's input (what a recomputed block keeps instead)."""

    outside: int
    inside: list[int]
    inputs: list[int]

    def held(self, recomputed: list[int]) -> int:
        """With the blocks at indices `recomputed` checkpointed: their inputs are kept instead
        of their insides, plus one block's insides while it is recomputed in backward."""
        kept = sum(b for i, b in enumerate(self.inside) if i not in recomputed)
        again = max((self.inside[i] for i in recomputed), default=0)
        return self.outside + kept + sum(self.inputs[i] for i in recomputed) + again


@dataclass
class MemoryEstimate:
    """Bytes per rank at the peak of a step (activations None: the forward could not run on
    the meta device). `host`: the sharded state lives in host memory (cpu_offload)."""

    strategy: str
    shard_size: int
    parameters: float
    gradients: float
    optimizer: float
    activations: float | None
    host: float = 0.0

    @property
    def total(self) -> float:
        return self.parameters + self.gradients + self.optimizer + (self.activations or 0.0)


def measure_activations(
    model: nn.Module, batch: tuple[Any, torch.Tensor], loss: LossFn
) -> Activations:
    """One forward + loss of `model` (on the meta device) on `batch` (moved there), counting
    the bytes of every tensor autograd saves, once each (views count as their base) and
    without parameters (saved weights are not activations)."""
    units = fsdp_units(model)
    where = [-1]  # the block running now (-1: outside every block)
    inside, inputs, outside = [0] * len(units), [0] * len(units), [0]
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # alive until counted, so no id is reused

    def pack(t: torch.Tensor) -> torch.Tensor:
        base = t._base if t._base is not None else t
        if id(base) not in seen and not isinstance(base, nn.Parameter):
            seen.add(id(base))
            keep.append(base)
            size = base.untyped_storage().nbytes()
            if where[0] >= 0:
                inside[where[0]] += size
            else:
                outside[0] += size
        return t

    def enter(i: int) -> Callable[..., None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            where[0] = i
            inputs[i] = sum(a.untyped_storage().nbytes() for a in args if torch.is_tensor(a))

        return hook

    def leave(*_: Any) -> None:
        where[0] = -1

    handles = [u.register_forward_pre_hook(enter(i)) for i, u in enumerate(units)]
    handles += [u.register_forward_hook(leave) for u in units]
    x, y = (t.to("meta") for t in batch)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss(model(x), y)
    finally:
        for h in handles:
            h.remove()
    return Activations(outside[0], inside, inputs)


def estimate(
    model: nn.Module,
    cfg: ParallelConfig,
    strategy: str,
    shard_size: int,
    activations: Activations | None,
    optimizer_bytes: int,
    param_bytes: int = 4,
) -> MemoryEstimate:
    """`model` on the meta device; `optimizer_bytes` of state per parameter (AdamW 8, SGD with
    momentum 4); `param_bytes` per element of a gathered parameter (the mixed-precision
    param_dtype: 2 for bf16/fp16). Parameters are fp32 at rest under every strategy."""
    units = fsdp_units(model)
    total = sum(p.numel() for p in model.parameters())
    largest = max((sum(p.numel() for p in u.parameters()) for u in units), default=0)
    root = total - sum(sum(p.numel() for p in u.parameters()) for u in units)
    act = None
    if activations is not None:
        index = {id(u): i for i, u in enumerate(units)}
        act = float(activations.held([index[id(u)] for u in recomputed_units(model, cfg)]))
    if strategy not in SHARDED:  # whole copies: weights, gradients (+ DDP's buckets), state
        grads = 4 * total * (2 if strategy == "ddp" else 1)
        return MemoryEstimate(strategy, 1, 4 * total, grads, optimizer_bytes * total, act)
    shard = 4 * total / shard_size
    if strategy == "zero2" or not cfg.reshard_after_forward:
        gathered = param_bytes * total  # every block stays gathered from forward to backward
    else:  # the root, one block gathered and the next one prefetched
        gathered = param_bytes * (root + 2 * largest)
    state = shard + shard + optimizer_bytes * total / shard_size  # weights, grads, optimizer
    on_host = state if cfg.cpu_offload else 0.0
    return MemoryEstimate(
        strategy,
        shard_size,
        gathered + (0.0 if cfg.cpu_offload else shard),
        param_bytes * largest + (0.0 if cfg.cpu_offload else shard),  # one block's unsharded
        0.0 if cfg.cpu_offload else optimizer_bytes * total / shard_size,
        act,
        on_host,
    )


def format_estimates(rows: list[MemoryEstimate], chosen: str, micro_batch: int) -> list[str]:
    """A small table, one row per strategy, the run's own marked."""
    mib = 2**20
    lines = [
        f"  memory per rank, estimated at the peak of a step (MiB; activations of one "
        f"micro-batch of {micro_batch}):",
        f"    {'strategy':<8} {'params':>9} {'grads':>9} {'optimizer':>9} "
        f"{'activations':>11} {'total':>9}",
    ]
    for r in rows:
        act = f"{r.activations / mib:11.2f}" if r.activations is not None else f"{'?':>11}"
        mark = "  <- this run" if r.strategy == chosen else ""
        host = f" (+{r.host / mib:.2f} in host memory)" if r.host else ""
        lines.append(
            f"    {r.strategy:<8} {r.parameters / mib:9.2f} {r.gradients / mib:9.2f} "
            f"{r.optimizer / mib:9.2f} {act} {r.total / mib:9.2f}{host}{mark}"
        )
    return lines
