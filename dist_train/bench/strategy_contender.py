"""One contender of `bench strategies` (a strategy x precision with its own Trainer) and the
per-rank memory it holds by construction, summed from local tensor sizes."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.bench.loops import FrameworkLoop
from dist_train.config.schema import RunConfig
from dist_train.launch.env import DistEnv
from dist_train.parallel.wrap import unwrap

PROBE_STEPS = 2  # untimed steps right after a contender is built: its memory is measured there
# (they run past the schedule bench_config sets by one step: the learning rate just stays at
# its floor, which costs the same)


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


class Contender:
    """One strategy x precision: its own Trainer, built and probed for memory right away, so
    that nothing else runs between its build and its memory figures."""

    def __init__(self, strategy: str, dtype: str, cfg: RunConfig, env: DistEnv) -> None:
        self.strategy, self.dtype, self.env = strategy, dtype, env
        cuda = env.device.type == "cuda"
        if cuda:  # the other contenders' memory stays allocated: count only what this one adds
            torch.cuda.synchronize(env.device)
            torch.cuda.reset_peak_memory_stats(env.device)
            before = torch.cuda.memory_allocated(env.device)
        self.loop = FrameworkLoop(cfg, env)
        self.grad_bytes = self._probe()
        self.cuda_peak_bytes = (
            (torch.cuda.max_memory_allocated(env.device) - before) if cuda else None
        )

    def _probe(self) -> int:
        """Run the first steps untimed and read the gradients' size right before `zero_grad`
        frees them (there they exist even when fp16's scaler skips the step)."""
        optimizer = self.loop.trainer.optimizer
        seen = [0]

        def zero_grad(set_to_none: bool = True) -> None:
            seen.append(_grad_bytes(optimizer))
            type(optimizer).zero_grad(optimizer, set_to_none=set_to_none)

        optimizer.zero_grad = zero_grad  # type: ignore[method-assign]
        try:
            self.loop.run(PROBE_STEPS)
        finally:
            del optimizer.zero_grad  # the class's own again: nothing extra in timed steps
        if self.env.device.type == "cuda":
            torch.cuda.synchronize(self.env.device)
        return max(seen)

    def memory(self) -> dict[str, int | None]:
        """This rank's share, read after the timed rounds (optimizer state exists by then)."""
        trainer = self.loop.trainer
        params = sum(_local_bytes(p) for p in unwrap(trainer.model).parameters())
        figures = {
            "params_bytes": params,
            "grads_bytes": self.grad_bytes,
            "optim_bytes": _optim_bytes(trainer.optimizer),
            "ddp_bucket_bytes": _bucket_bytes(trainer.model),
        }
        return {
            **figures,
            "state_bytes": sum(figures.values()),
            "cuda_peak_bytes": self.cuda_peak_bytes,
        }
