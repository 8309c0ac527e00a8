"""One contender of `bench strategies` (dist_train's loop for one strategy and activation
checkpointing setting, or its hand-written twin), built and probed inside a memory window: the
bytes it adds to the process at its peak, and the bytes one forward leaves for backward.
Where the allocator cannot be read, the per-rank state summed from tensor sizes stands in."""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.bench.loops import FrameworkLoop, RawLoop
from dist_train.bench.memory_meter import MemoryMeter
from dist_train.launch.env import DistEnv
from dist_train.parallel.wrap import unwrap

PROBE_STEPS = 2  # untimed steps right after a contender is built: its memory is measured there
# (they run past the schedule bench_config sets by one step: the learning rate just stays at
# its floor, which costs the same)

Loop = FrameworkLoop | RawLoop


def _local_bytes(t: torch.Tensor) -> int:
    """Bytes this rank stores for `t`: its own shard when `t` is a DTensor (FSDP2)."""
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _grad_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        _local_bytes(p.grad)
        for g in optimizer.param_groups
        for p in g["params"]
        if p.grad is not None
    )


def _optim_bytes(optimizer: torch.optim.Optimizer) -> int:
    return sum(
        _local_bytes(v)
        for state in optimizer.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def _bucket_bytes(model: nn.Module) -> int:
    """DDP keeps its own flat gradient buckets for the all-reduce (gradients are not views of
    them unless `gradient_as_bucket_view`): about one more copy of the gradients. Only DDP's
    logging data tells their sizes; 0 if a torch version stops providing it."""
    if not isinstance(model, DDP):
        return 0
    try:
        sizes = str(model._get_ddp_logging_data().get("bucket_sizes", ""))
        return sum(int(s) for s in sizes.replace(" ", "").split(",") if s)
    except (AttributeError, RuntimeError, ValueError):
        return 0


def _gathered_bytes(module: nn.Module) -> int:
    """Parameters held whole: all of them without FSDP; under FSDP2 the blocks gathered now
    (their parameters are plain tensors then, DTensor shards once resharded)."""
    return sum(
        p.numel() * p.element_size() for p in module.parameters() if not isinstance(p, DTensor)
    )


def parts(loop: Loop) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(the wrapped model, the user's module, the optimizer) of either kind of loop."""
    if isinstance(loop, FrameworkLoop):
        trainer = loop.trainer
        return trainer.model, unwrap(trainer.model), trainer.optimizer
    return loop.model, loop.module, loop.optimizer


class Contender:
    """Built inside a memory window and probed right away, so that nothing else runs between
    its build and its figures. The other contenders stay alive: the window's peak minus what
    was in use just before the build is what this one adds."""

    def __init__(self, build: Callable[[], Loop], env: DistEnv, meter: MemoryMeter) -> None:
        self.env, self.meter = env, meter
        gc.collect()  # garbage of earlier builds, freed inside the window, would hide bytes
        before = meter.in_use()
        with meter.window() as window:
            self.loop: Loop = build()
            self.activation_bytes, self.grad_bytes = self._probe()
        self.peak_bytes = window.peak - before if meter.available else None

    def _probe(self) -> tuple[int | None, int]:
        """Run the first steps untimed. Activations: bytes in use after the root module's
        forward minus before it, less parameters gathered meanwhile (zero2 keeps every block
        gathered until backward: weights, not activations); the largest over the steps.
        Gradients: their size right before `zero_grad` frees them (there they exist even when
        fp16's scaler skips the step): the tensor-size figure, for when no meter reads."""
        _, module, optimizer = parts(self.loop)
        marks: list[tuple[int, int]] = []
        grads = [0]

        def mark(*_: Any) -> None:
            marks.append((self.meter.in_use(), _gathered_bytes(module)))

        def zero_grad(set_to_none: bool = True) -> None:
            grads.append(_grad_bytes(optimizer))
            type(optimizer).zero_grad(optimizer, set_to_none=set_to_none)

        handles = [module.register_forward_pre_hook(mark), module.register_forward_hook(mark)]
        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        try:
            self.loop.run(PROBE_STEPS)
        finally:
            del optimizer.zero_grad  # the class's own again: nothing extra in timed steps
            for h in handles:
                h.remove()
        if not self.meter.available:
            return None, max(grads)
        pairs = zip(marks[::2], marks[1::2], strict=True)
        return max((a[0] - b[0]) - (a[1] - b[1]) for b, a in pairs), max(grads)

    def figures(self) -> dict[str, int | None]:
        """This rank's figures, read after the timed rounds (optimizer state exists by then):
        the measured ones, and the state summed from local tensor sizes."""
        wrapped, module, optimizer = parts(self.loop)
        state = {
            "params_bytes": sum(_local_bytes(p) for p in module.parameters()),
            "grads_bytes": self.grad_bytes,
            "optim_bytes": _optim_bytes(optimizer),
            "ddp_bucket_bytes": _bucket_bytes(wrapped),
        }
        return {
            "peak_bytes": self.peak_bytes,
            "activation_bytes": self.activation_bytes,
            **state,
            "state_bytes": sum(state.values()),
        }
