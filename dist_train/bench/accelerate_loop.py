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

from dist_train.bench.harness import BenchArgs, bench_config, measure_interleaved, run_workers
from dist_train.bench.loops import (
    FrameworkLoop,
    check_plain_ddp,
    count_host_syncs,
    max_param_diff,
    rank_batches,
    raw_loss,
    raw_optimizer,
    training_settings,
)
from dist_train.bench.report import TIMING_COLUMNS, BenchReport, timing_rows
from dist_train.bench.stats import ratio_summary, round_medians
from dist_train.config import RunConfig, accumulation_steps, micro_batch_size
from dist_train.data import Data
from dist_train.env import DistEnv
from dist_train.errors import ConfigError
from dist_train.models import build_model
from dist_train.optim import lr_at
from dist_train.plan import device_kind

FRAMEWORK, ACCELERATE = "dist_train", "accelerate"
MIXED_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def check_config(cfg: RunConfig, nproc: int) -> None:
    check_plain_ddp(cfg, nproc)
    if cfg.precision.dtype == "fp16" and device_kind(cfg) != "cuda":
        # Accelerate 1.x turns fp16 on only for accelerators: on CPU it would silently train
        # in fp32 (no autocast, no scaler) against dist_train's fp16 autocast.
        raise ConfigError("precision.dtype", "fp16",
                          "Accelerate ignores fp16 on CPU (it would train in fp32); use bf16")


class AccelerateLoop:
    """The loop of Accelerate's README: the model and optimizer go through `prepare` (DDP with
    the same bucket size when there are several processes, autocast for mixed precision),
    `accelerator.backward`, `accelerator.clip_grad_norm_`. Same batches as dist_train."""

    def __init__(self, cfg: RunConfig, env: DistEnv, data: Data, steps: int) -> None:
        self.cfg, self.data = cfg, data
        # Under our spawned workers the torchrun variables are set and the gloo group exists:
        # Accelerate (MULTI_CPU) adopts that group rather than starting its own.
        self.accelerator = Accelerator(
            mixed_precision=MIXED_PRECISION[cfg.precision.dtype], cpu=env.device.type == "cpu",
            kwargs_handlers=[DistributedDataParallelKwargs(
                bucket_cap_mb=cfg.parallel.bucket_cap_mb, static_graph=cfg.parallel.static_graph)])
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
            lr = lr_at(self.step, cfg.optim, cfg.train.max_steps)
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
    cfg = bench_config(args)
    framework = FrameworkLoop(cfg, env)
    contender = AccelerateLoop(cfg, env, framework.data, args.total_steps)
    try:
        # Accelerate sets its own thread count when OMP_NUM_THREADS is unset; we set it, and
        # set the threads again here so both contenders run with exactly the same.
        torch.set_num_threads(args.threads)
        times = measure_interleaved({FRAMEWORK: framework.run, ACCELERATE: contender.run},
                                    args, env)
        syncs = {FRAMEWORK: count_host_syncs(framework.run),
                 ACCELERATE: count_host_syncs(contender.run)}
        diff = max_param_diff(framework.parameters(), contender.parameters())
        distributed_type = str(contender.accelerator.distributed_type)
    finally:
        contender.close()
        framework.close()
    return {"step_times": times, "max_param_diff": diff, "host_syncs_per_step": syncs,
            "threads": torch.get_num_threads(),
            "accelerate_version": accelerate.__version__,
            "accelerate_distributed_type": distributed_type,
            **training_settings(cfg, env, framework)}


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times = result.pop("step_times")
    batch = result["global_batch_size"]
    rows = timing_rows(times, {FRAMEWORK: batch, ACCELERATE: batch}, result["tokens_per_sample"])
    return BenchReport(
        "accelerate", {**result, "args": args.to_json()}, rows, TIMING_COLUMNS,
        ratios={f"step time {FRAMEWORK}/{ACCELERATE}": ratio_summary(
            round_medians(times[FRAMEWORK]), round_medians(times[ACCELERATE]))},
        notes=[f"{args.nproc} worker(s) x {result['threads']} thread(s), {result['precision']}, "
               f"global batch {batch}, accelerate {result['accelerate_version']} "
               f"({result['accelerate_distributed_type']}); parameters after the run differ by "
               f"at most {result['max_param_diff']:.2g}",
               f"host syncs (tensor value reads) per step: {result['host_syncs_per_step']}"])
