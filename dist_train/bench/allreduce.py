"""`bench allreduce`: all-reduce time and bus bandwidth over message sizes on the run's backend
(gloo on CPU, nccl on CUDA): the physical reference for DDP's gradient sync."""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from dist_train.bench.harness import BenchArgs, bench_config, measure_interleaved, run_workers
from dist_train.bench.report import BenchReport, Column
from dist_train.bench.stats import round_medians, summarize
from dist_train.config.schema import RunConfig
from dist_train.data.build import build_data
from dist_train.launch.env import DistEnv
from dist_train.models.registry import build_model

SIZES = [4096 * 4**k for k in range(8)]  # 4 KiB .. 64 MiB: latency-bound to bandwidth-bound


def label(nbytes: int) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"


def gradient_bytes(cfg: RunConfig) -> int:
    """Bytes of the config's model gradients (fp32, like its parameters): what DDP all-reduces
    every step, in buckets of `parallel.bucket_cap_mb`."""
    model = build_model(cfg.model, build_data(cfg).spec)
    return 4 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def _all_reduce(tensor: torch.Tensor, n: int) -> None:
    for _ in range(n):
        dist.all_reduce(tensor)  # zeros stay zeros: no overflow however often it runs


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    cfg = bench_config(args)
    grads = gradient_bytes(cfg)
    sizes = {label(n): n for n in SIZES}
    sizes[f"grads {label(grads)}"] = grads
    tensors = {
        name: torch.zeros(n // 4, dtype=torch.float32, device=env.device)
        for name, n in sizes.items()
    }
    times = measure_interleaved(
        {name: partial(_all_reduce, t) for name, t in tensors.items()}, args, env
    )
    return {
        "op_times": times,
        "bytes": sizes,
        "gradient_bytes": grads,
        "world_size": env.world_size,
        "backend": env.backend,
        "device": str(env.device),
        "bucket_cap_mb": cfg.parallel.bucket_cap_mb,
        "dtype": "fp32",
        "threads": torch.get_num_threads(),
    }


def rows_for(
    times: dict[str, list[list[float]]], sizes: dict[str, int], world_size: int
) -> list[dict[str, Any]]:
    """nccl-tests' definitions: algbw = bytes / time; busbw = algbw x 2(n-1)/n, the traffic
    each link carries in a ring all-reduce, comparable across world sizes."""
    factor = 2 * (world_size - 1) / world_size
    rows = []
    for name in sorted(times, key=lambda k: sizes[k]):
        per_round = round_medians(times[name])
        algbw = [sizes[name] / t / 1e9 for t in per_round]
        rows.append(
            {
                "name": name,
                "bytes": sizes[name],
                "time_s": summarize(per_round),
                "algbw_GBps": summarize(algbw),
                "busbw_GBps": summarize([b * factor for b in algbw]),
                "time_s_per_round": per_round,
                "op_times_s": times[name],
            }
        )
    peak = max(r["busbw_GBps"]["median"] for r in rows)
    for r in rows:
        r["of_peak"] = r["busbw_GBps"]["median"] / peak
    return rows


COLUMNS = [
    Column("time_s.median", "time us", 1e6, ".1f"),
    Column("time_s.q1", "q1 us", 1e6, ".1f"),
    Column("time_s.q3", "q3 us", 1e6, ".1f"),
    Column("algbw_GBps.median", "algbw GB/s", 1.0, ".3f"),
    Column("busbw_GBps.median", "busbw GB/s", 1.0, ".3f"),
    Column("of_peak", "of peak", 1.0, ".2f"),
]


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times, sizes = result.pop("op_times"), result["bytes"]
    rows = rows_for(times, sizes, result["world_size"])
    grads = next(r for r in rows if r["name"].startswith("grads"))
    return BenchReport(
        "allreduce",
        {**result, "args": args.to_json()},
        rows,
        COLUMNS,
        notes=[
            f"{result['world_size']} workers x {result['threads']} thread(s), "
            f"{result['backend']} on {result['device']}, fp32 sum; busbw = algbw x 2(n-1)/n",
            f"this model's gradients ({label(result['gradient_bytes'])}) in one all-reduce: "
            f"{grads['time_s']['median'] * 1e3:.2f} ms, {grads['of_peak']:.2f} of peak bus "
            "bandwidth",
        ],
    )
