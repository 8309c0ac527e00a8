"""`bench overhead`: dist_train's training step versus a minimal hand-written PyTorch loop doing
the same work, interleaved in the same processes with the same threads."""

from __future__ import annotations

from typing import Any, Protocol

import torch

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
from dist_train.launch.env import DistEnv

FRAMEWORK, RAW = "dist_train", "raw_torch"


class Contender(Protocol):
    def run(self, steps: int) -> None: ...
    def parameters(self) -> list[torch.Tensor]: ...
    def close(self) -> None: ...


def head_to_head(
    args: BenchArgs, env: DistEnv, framework: FrameworkLoop, name: str, contender: Contender
) -> dict[str, Any]:
    """Interleaved rounds of dist_train against one other loop doing the same work."""
    try:
        # Some contenders (Accelerate) set their own thread count while being built: set it
        # again so both run with exactly the same threads.
        torch.set_num_threads(args.threads)
        times = measure_interleaved({FRAMEWORK: framework.run, name: contender.run}, args, env)
        syncs = {FRAMEWORK: count_host_syncs(framework.run), name: count_host_syncs(contender.run)}
        diff = max_param_diff(framework.parameters(), contender.parameters())
    finally:  # DDP wrappers go before the process group does
        contender.close()
        framework.close()
    return {
        "step_times": times,
        "max_param_diff": diff,
        "host_syncs_per_step": syncs,
        "threads": torch.get_num_threads(),
        **training_settings(framework.trainer.cfg, env, framework),
    }


def head_to_head_report(
    args: BenchArgs, result: dict[str, Any], name: str, setup: str = ""
) -> BenchReport:
    times = result.pop("step_times")
    batch = result["global_batch_size"]
    rows = timing_rows(times, {FRAMEWORK: batch, name: batch}, result["tokens_per_sample"])
    return BenchReport(
        args.name,
        {**result, "args": args.to_json()},
        rows,
        TIMING_COLUMNS,
        ratios={
            f"step time {FRAMEWORK}/{name}": ratio_summary(
                round_medians(times[FRAMEWORK]), round_medians(times[name])
            )
        },
        notes=[
            f"{args.nproc} worker(s) x {result['threads']} thread(s), {result['strategy']}, "
            f"{result['precision']}, global batch {batch}{setup}; parameters after the run "
            f"differ by at most {result['max_param_diff']:.2g} (same work)",
            f"host syncs (tensor value reads) per step: {result['host_syncs_per_step']}",
        ],
    )


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    framework = FrameworkLoop(bench_config(args), env)
    return head_to_head(
        args,
        env,
        framework,
        RAW,
        RawLoop(framework.trainer.cfg, env, framework.data, args.total_steps),
    )


def run(args: BenchArgs) -> BenchReport:
    return head_to_head_report(args, run_workers(worker, args), RAW)
