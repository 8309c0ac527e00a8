"""`bench accelerate`: dist_train's training step versus a minimal Hugging Face Accelerate loop
(`Accelerator`, `prepare`, `backward`, the same mixed precision), interleaved in one process."""

from __future__ import annotations

import gc
from contextlib import nullcontext
from typing import Any

import accelerate
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs

from dist_train.bench.harness import BenchArgs, bench_config, run_workers
from dist_train.bench.loops import (
    FrameworkLoop,
    check_plain_ddp,
    rank_batches,
    raw_loss,
    raw_optimizer,
)
from dist_train.bench.overhead import head_to_head, head_to_head_report
from dist_train.bench.report import BenchReport
from dist_train.config.schema import RunConfig, accumulation_steps, micro_batch_size
from dist_train.data.datasets import Data
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.registry import build_model
from dist_train.train.optim import decay_horizon, lr_at
from dist_train.train.plan import device_kind

ACCELERATE = "accelerate"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def check_config(cfg: RunConfig, nproc: int) -> None:
    check_plain_ddp(cfg, nproc)
    if cfg.precision.dtype == "fp16" and device_kind(cfg) != "cuda":
        # Accelerate 1.x turns fp16 on only for accelerators: on CPU it would silently train
        # in fp32 (no autocast, no scaler) against dist_train's fp16 autocast.
        raise ConfigError(
            "precision.dtype",
            "fp16",
            "Accelerate ignores fp16 on CPU (it would train in fp32); use bf16",
        )


class AccelerateLoop:
    """The loop of Accelerate's README: the model and optimizer go through `prepare` (DDP with
    the same bucket size when there are several processes, autocast for mixed precision),
    `accelerator.backward`, `accelerator.clip_grad_norm_`. Same batches as dist_train."""

    def __init__(self, cfg: RunConfig, env: DistEnv, data: Data, steps: int) -> None:
        self.cfg, self.data = cfg, data
        # Under our spawned workers the torchrun variables are set and the gloo group exists:
        # Accelerate (MULTI_CPU) adopts that group rather than starting its own.
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[cfg.precision.dtype],
            cpu=env.device.type == "cpu",
            kwargs_handlers=[
                DistributedDataParallelKwargs(
                    bucket_cap_mb=cfg.parallel.bucket_cap_mb, static_graph=cfg.parallel.static_graph
                )
            ],
        )
        torch.manual_seed(cfg.train.seed)  # the same initial weights as the others
        model = build_model(cfg.model, data.spec)
        self.module = model
        optimizer = raw_optimizer(cfg, model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.accum = accumulation_steps(cfg, env.world_size)
        self.micro = micro_batch_size(cfg, env.world_size)
        self.batches = rank_batches(cfg, env, data, steps)
        self.step = 0

    def run(self, steps: int) -> None:
        acc, model, opt, cfg = self.accelerator, self.model, self.optimizer, self.cfg
        for _ in range(steps):
            lr = lr_at(self.step, cfg.optim, decay_horizon(cfg.optim, cfg.train.max_steps))
            for group in opt.param_groups:
                group["lr"] = lr
            chunks = self.batches[self.step].split(self.micro)
            for i, chunk in enumerate(chunks):
                x, y = self.data.train.get_batch(chunk)
                x, y = x.to(acc.device), y.to(acc.device)
                last = i == len(chunks) - 1
                with nullcontext() if last else acc.no_sync(model):
                    loss = raw_loss(model(x), y, self.data.spec.task)
                    acc.backward(loss / self.accum if self.accum > 1 else loss)
            if cfg.optim.grad_clip > 0:
                acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step += 1

    def parameters(self) -> list[torch.Tensor]:
        return list(self.module.parameters())

    def close(self) -> None:
        """Accelerate keeps references to prepared models: release them (and the DDP wrapper
        with them) before the process group goes."""
        self.accelerator.free_memory()
        self.model = self.optimizer = None  # type: ignore[assignment]
        gc.collect()


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    framework = FrameworkLoop(bench_config(args), env)
    contender = AccelerateLoop(framework.trainer.cfg, env, framework.data, args.total_steps)
    distributed_type = str(contender.accelerator.distributed_type)
    return {
        **head_to_head(args, env, framework, ACCELERATE, contender),
        "accelerate_version": accelerate.__version__,
        "accelerate_distributed_type": distributed_type,
    }


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    return head_to_head_report(
        args,
        result,
        ACCELERATE,
        f", accelerate {result['accelerate_version']} ({result['accelerate_distributed_type']})",
    )
