"""`bench scaling`: dist_train's samples/s on 1 worker and on N workers with the same per-worker
batch and threads (weak scaling), interleaved in the same N processes."""

from __future__ import annotations

from typing import Any

import torch

from dist_train.bench.harness import BenchArgs, bench_config, measure_interleaved, run_workers
from dist_train.bench.loops import FrameworkLoop, training_settings
from dist_train.bench.report import TIMING_COLUMNS, BenchReport, timing_rows
from dist_train.bench.stats import ratio_summary, round_medians
from dist_train.launch.env import DistEnv


def _idle(steps: int) -> None:
    """Ranks other than 0 while one worker trains alone: they wait in the next collective."""


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    solo_cfg = bench_config(args, run="solo")  # the config as given is one worker's share
    n = env.world_size
    group_cfg = bench_config(
        args, [f"train.global_batch_size={solo_cfg.train.global_batch_size * n}"], run="group"
    )
    # Rank 0 alone, as a one-worker run: its own environment, no DDP, no collectives.
    solo_env = DistEnv(0, 0, 1, 1, env.device, env.backend)
    solo = FrameworkLoop(solo_cfg, solo_env) if env.is_main else None
    group = FrameworkLoop(group_cfg, env)
    names = ("1 worker", f"{n} workers")
    try:
        torch.set_num_threads(args.threads)
        times = measure_interleaved(
            {names[0]: solo.run if solo else _idle, names[1]: group.run}, args, env
        )
    finally:
        group.close()
        if solo:
            solo.close()
    return {
        "step_times": times,
        "names": names,
        "threads": torch.get_num_threads(),
        "per_worker_batch": solo_cfg.train.global_batch_size,
        **training_settings(group_cfg, env, group),
    }


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times = result.pop("step_times")
    (solo, group), n, batch = result["names"], result["world_size"], result["per_worker_batch"]
    rows = timing_rows(times, {solo: batch, group: batch * n}, result["tokens_per_sample"])
    # Efficiency = samples/s at N / (N x samples/s at 1) = step time at 1 / step time at N.
    efficiency = ratio_summary(round_medians(times[solo]), round_medians(times[group]))
    return BenchReport(
        "scaling",
        {**result, "args": args.to_json()},
        rows,
        TIMING_COLUMNS,
        ratios={f"scaling efficiency ({group} vs {n} x 1 worker)": efficiency},
        notes=[
            f"each worker: batch {batch}, {result['threads']} thread(s) ({result['precision']}); "
            f"{group} = {efficiency['median'] * n:.2f}x the samples/s of 1 worker"
        ],
    )
