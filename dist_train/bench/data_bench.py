"""`bench data`: a map-style dataset whose samples cost CPU time to produce (a stand-in for
decoding and augmenting), trained by dist_train with DataLoader workers, by a hand-written loop
with its own DataLoader and the same workers, and by dist_train loading on the training thread.

The first ratio is the framework's cost over a plain loop with background loading; the second
shows the loading hidden behind the step (with enough cores for the workers).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dist_train.bench.harness import BenchArgs, bench_config, measure_interleaved, run_workers
from dist_train.bench.loops import (
    FrameworkLoop,
    RawLoop,
    count_host_syncs,
    max_param_diff,
    training_settings,
)
from dist_train.bench.report import TIMING_COLUMNS, BenchReport, timing_rows
from dist_train.bench.stats import ratio_summary, round_medians
from dist_train.config.load import load_config
from dist_train.config.schema import RunConfig
from dist_train.data.datasets import Data, MapDatasetAdapter
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv

WORKERS, RAW, NO_WORKERS = "dist_train", "raw_torch", "dist_train num_workers=0"
# Under the user's overrides: the benchmark's own dataset and model, 2 loading workers.
DEFAULTS = (
    "data._target_=dist_train.bench.data_bench.CostlySamples",
    "model._target_=dist_train.bench.data_bench.WideMLP",
    "train.global_batch_size=16",
    "data.num_workers=2",
    "optim.lr=0.001",
)


class CostlySamples(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Random features and labels; each item first spends `work` iterations of pure-Python
    arithmetic (about 1.5 ms of one core for 20000): the same CPU cost for every contender."""

    task = "classification"

    def __init__(self, split: str, n: int = 4096, dim: int = 256, work: int = 20000) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.x = torch.randn(n, dim, generator=g)
        self.y = torch.randint(10, (n,), generator=g)
        self.work = work

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        acc = 0
        for k in range(self.work):
            acc = (acc * 31 + k) % 1_000_003
        return self.x[i] + 0.0 * (acc & 1), self.y[i]


class WideMLP(nn.Module):
    def __init__(self, dim: int = 256, hidden: int = 2048, classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.GELU(),
            nn.Linear(hidden, classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LoaderLoop(RawLoop):
    """The hand-written loop fed as one writes it: a DataLoader over the user's dataset with a
    batch sampler of this rank's micro-batches (the same indices as dist_train's), the same
    workers, prefetching and pinning."""

    def __init__(self, cfg: RunConfig, env: DistEnv, data: Data, steps: int) -> None:
        super().__init__(cfg, env, data, steps)
        d = cfg.data
        chunks = [c.tolist() for batch in self.batches for c in batch.split(self.micro)]
        assert isinstance(data.train, MapDatasetAdapter)  # checked by `check_config`
        self.loader = DataLoader(
            data.train.dataset,
            batch_sampler=chunks,
            num_workers=d.num_workers,
            pin_memory=env.device.type == "cuda",
            prefetch_factor=d.prefetch_factor if d.num_workers else None,
            persistent_workers=d.num_workers > 0,
        )
        self.stream = iter(self.loader)

    def _load(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = next(self.stream)
        return x.to(self.env.device, non_blocking=True), y.to(self.env.device, non_blocking=True)

    def close(self) -> None:
        shutdown = getattr(self.stream, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()
        super().close()


def _with_defaults(args: BenchArgs) -> BenchArgs:
    return dataclasses.replace(args, config=None, overrides=(*DEFAULTS, *args.overrides))


def check_config(cfg: RunConfig, nproc: int) -> None:
    if cfg.data._target_ and not cfg.data._target_.endswith("CostlySamples"):
        raise ConfigError(
            "data._target_", cfg.data._target_, "bench data uses its own dataset (CostlySamples)"
        )


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    cfg = bench_config(args)
    framework = FrameworkLoop(cfg, env)
    plain = FrameworkLoop(bench_config(args, ["data.num_workers=0"], run="plain"), env)
    raw = LoaderLoop(framework.trainer.cfg, env, framework.data, args.total_steps)
    loops = {WORKERS: framework, RAW: raw, NO_WORKERS: plain}
    try:
        torch.set_num_threads(args.threads)
        times = measure_interleaved({name: loop.run for name, loop in loops.items()}, args, env)
        syncs = {name: count_host_syncs(loop.run) for name, loop in loops.items()}
        diff = max_param_diff(framework.parameters(), raw.parameters())
    finally:
        for loop in loops.values():
            loop.close()
    return {
        "step_times": times,
        "max_param_diff": diff,
        "host_syncs_per_step": syncs,
        "threads": torch.get_num_threads(),
        "num_workers": cfg.data.num_workers,
        "sample_work": cfg.data.kwargs.get("work", 20000),
        **training_settings(cfg, env, framework),
    }


def run(args: BenchArgs) -> BenchReport:
    args = _with_defaults(args)
    loading = load_config(None, args.overrides).data.num_workers
    if loading < 1:
        raise ConfigError("data.num_workers", loading, "bench data compares loading workers: >= 1")
    if "OMP_NUM_THREADS" not in os.environ:  # the loading workers need cores too
        spare = (os.cpu_count() or 1) - loading * args.nproc
        args = dataclasses.replace(args, threads=max(1, spare // args.nproc))
    result = run_workers(worker, args)
    times = result.pop("step_times")
    batch = result["global_batch_size"]
    rows = timing_rows(times, dict.fromkeys(times, batch), result["tokens_per_sample"])
    medians = {name: round_medians(t) for name, t in times.items()}
    return BenchReport(
        args.name,
        {**result, "args": args.to_json()},
        rows,
        TIMING_COLUMNS,
        ratios={
            f"step time {WORKERS}/{RAW}": ratio_summary(medians[WORKERS], medians[RAW]),
            f"step time {WORKERS}/{NO_WORKERS}": ratio_summary(
                medians[WORKERS], medians[NO_WORKERS]
            ),
        },
        notes=[
            f"{args.nproc} worker(s) x {result['threads']} thread(s), "
            f"{result['num_workers']} loading worker(s) each, global batch {batch}, "
            f"{result['sample_work']} work units per sample; parameters after the run differ "
            f"by at most {result['max_param_diff']:.2g} (same work)",
            f"host syncs (tensor value reads) per step: {result['host_syncs_per_step']}",
        ],
    )
