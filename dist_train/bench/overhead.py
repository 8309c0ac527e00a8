"""`bench overhead`: dist_train's training step versus a minimal hand-written PyTorch loop doing
the same work, interleaved in the same processes with the same threads."""

from __future__ import annotations

from typing import Any

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
from dist_train.env import DistEnv

FRAMEWORK, RAW = "dist_train", "raw_torch"


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    cfg = bench_config(args)
    framework = FrameworkLoop(cfg, env)
    raw = RawLoop(cfg, env, framework.data, args.total_steps)
    try:
        torch.set_num_threads(args.threads)
        times = measure_interleaved({FRAMEWORK: framework.run, RAW: raw.run}, args, env)
        syncs = {FRAMEWORK: count_host_syncs(framework.run), RAW: count_host_syncs(raw.run)}
        diff = max_param_diff(framework.parameters(), raw.parameters())
    finally:  # DDP wrappers go before the process group does
        raw.close()
        framework.close()
    return {"step_times": times, "max_param_diff": diff, "host_syncs_per_step": syncs,
            "threads": torch.get_num_threads(),
            **training_settings(cfg, env, framework)}


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times = result.pop("step_times")
    batch = result["global_batch_size"]
    rows = timing_rows(times, {FRAMEWORK: batch, RAW: batch}, result["tokens_per_sample"])
    return BenchReport(
        "overhead", {**result, "args": args.to_json()}, rows, TIMING_COLUMNS,
        ratios={f"step time {FRAMEWORK}/{RAW}": ratio_summary(round_medians(times[FRAMEWORK]),
                                                            round_medians(times[RAW]))},
        notes=[f"{args.nproc} worker(s) x {result['threads']} thread(s), "
               f"{result['precision']}, global batch {batch}; parameters after the run differ "
               f"by at most {result['max_param_diff']:.2g} (same work)",
               f"host syncs (tensor value reads) per step: {result['host_syncs_per_step']}"])
