"""`bench strategies`: the same model and global batch under none / DDP / FSDP and each
precision (fp32, bf16, fp16), interleaved in the same N processes; step time, samples/s and
memory per rank, each as a ratio to DDP fp32 measured in the same rounds.

DDP and FSDP run on the N-worker group. `none` only exists for one worker, so it runs on rank 0
alone (as `bench scaling` does) with the whole global batch and one worker's threads: a
reference for what the parallel strategies buy, not the ratio base.

Memory: on CUDA the allocator's peak (`max_memory_allocated`) over a contender's build and its
first steps, above what was allocated before it was built. On CPU there is no allocator
statistic, so the figure is what each rank holds by construction: parameters, gradients and
optimizer state (local shards under FSDP) and DDP's gradient buckets, summed from tensor sizes;
activations and temporaries are not in it.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from dist_train.bench.harness import BenchArgs, bench_config, measure_interleaved, run_workers
from dist_train.bench.loops import training_settings
from dist_train.bench.report import TIMING_COLUMNS, BenchReport, Column, timing_rows
from dist_train.bench.stats import ratio_summary, round_medians
from dist_train.bench.strategy_contender import Contender
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.parallel.precision import DTYPES, check_supported

GROUP_STRATEGIES = ("ddp", "fsdp")
BASE = "ddp fp32"
MIB = 2**20


def check_config(cfg: RunConfig, nproc: int) -> None:
    """Compression hooks are DDP's only: FSDP contenders could not run with them, and compressed
    DDP against uncompressed FSDP would compare different work."""
    if cfg.parallel.grad_compression != "none":
        raise ConfigError(
            "parallel.grad_compression",
            cfg.parallel.grad_compression,
            "this benchmark compares strategies without compression; use none",
        )


def _supported(dtype: str, device: torch.device) -> bool:
    try:
        check_supported(dtype, device)
    except ConfigError:
        return False
    return True


def _idle(steps: int) -> None:
    """Ranks other than 0 while `none` trains alone: they wait in the next collective."""


def _build(
    args: BenchArgs, env: DistEnv, dtypes: list[str], built: dict[str, Contender | None]
) -> None:
    """Fill `built` as each contender is built: the caller closes whatever was built, even when
    a later build fails."""
    solo_env = DistEnv(0, 0, 1, 1, env.device, env.backend)  # rank 0 alone: no group, no DDP

    def config(strategy: str, dtype: str) -> RunConfig:
        return bench_config(
            args,
            [f"parallel.strategy={strategy}", f"precision.dtype={dtype}"],
            run=f"{strategy}_{dtype}",
        )

    # Every rank builds the group contenders in the same order (DDP's broadcast, FSDP's mesh and
    # the checkpointer's group are collectives); rank 0 also builds the solo ones.
    plan = [(s, d) for s in GROUP_STRATEGIES for d in dtypes]
    plan += [("none", d) for d in dtypes]
    for strategy, dtype in plan:
        solo = strategy == "none"
        built[f"{strategy} {dtype}"] = (
            None
            if solo and not env.is_main
            else Contender(strategy, dtype, config(strategy, dtype), solo_env if solo else env)
        )


def _gather_memory(
    memory: dict[str, dict[str, int | None] | None], env: DistEnv
) -> list[dict[str, Any]]:
    """One figure per rank for each contender (None where a rank does not hold it)."""
    per_rank: list[dict[str, Any]] = [{} for _ in range(env.world_size)]
    if env.is_distributed:
        dist.all_gather_object(per_rank, memory)
    else:
        per_rank = [memory]
    return per_rank


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    dtypes = [d for d in DTYPES if _supported(d, env.device)]
    built: dict[str, Contender | None] = {}
    try:
        _build(args, env, dtypes, built)
        torch.set_num_threads(args.threads)  # the same for every contender, solo included
        runners: dict[str, Callable[[int], None]] = {
            name: c.loop.run if c else _idle for name, c in built.items()
        }
        times = measure_interleaved(runners, args, env)
        memory = {name: c.memory() if c else None for name, c in built.items()}
    finally:  # every DDP wrapper goes before the process group does
        for c in built.values():
            if c:
                c.loop.close()
    per_rank = _gather_memory(memory, env)
    base = built[BASE]
    assert base is not None  # a group contender: every rank holds it
    settings = training_settings(base.loop.trainer.cfg, env, base.loop)
    del settings["precision"]  # the base's; every contender's is in its row
    return {
        "step_times": times,
        "memory": per_rank,
        "dtypes": dtypes,
        "threads": torch.get_num_threads(),
        "peak_rss_mib_per_rank": _gather_rss(env),
        **settings,
    }


def _gather_rss(env: DistEnv) -> list[float]:
    """The whole process's peak resident memory (all contenders together)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    mib = peak / MIB if sys.platform == "darwin" else peak / 1024
    if not env.is_distributed:
        return [mib]
    out: list[float] = [0.0] * env.world_size
    dist.all_gather_object(out, mib)
    return out


def _memory_row(name: str, per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """A contender's memory figures: every rank's, and the largest (the rank that needs most)."""
    ranks = [r[name] for r in per_rank if r.get(name) is not None]
    row: dict[str, Any] = {
        "memory_per_rank": ranks,
        "state_bytes": max(r["state_bytes"] for r in ranks),
    }
    peaks = [r["cuda_peak_bytes"] for r in ranks if r["cuda_peak_bytes"] is not None]
    if peaks:
        row["cuda_peak_bytes"] = max(peaks)
    return row


def _rows(
    times: dict[str, list[list[float]]], per_rank: list[dict[str, Any]], result: dict[str, Any]
) -> list[dict[str, Any]]:
    """Timing and memory per contender, each also as a ratio to the base's."""
    batch, n = result["global_batch_size"], result["world_size"]
    rows = timing_rows(times, dict.fromkeys(times, batch), result["tokens_per_sample"])
    base_times = round_medians(times[BASE])
    for row in rows:
        strategy, dtype = row["name"].split()
        row.update(
            strategy=strategy,
            precision=dtype,
            workers=1 if strategy == "none" else n,
            **_memory_row(row["name"], per_rank),
        )
        # Paired per round against the base: drift of the machine cancels in the ratio.
        row["step_time_vs_base"] = ratio_summary(round_medians(times[row["name"]]), base_times)
    base = next(r for r in rows if r["name"] == BASE)
    cuda = "cuda_peak_bytes" in base
    for row in rows:
        row["state_vs_base"] = row["state_bytes"] / base["state_bytes"]
        if cuda:
            row["cuda_peak_vs_base"] = row["cuda_peak_bytes"] / base["cuda_peak_bytes"]
    return rows


def _columns(cuda: bool) -> list[Column]:
    columns = [
        *TIMING_COLUMNS,
        Column("workers", "workers", 1.0, ".0f"),
        Column("state_bytes", "state MiB/rank", 1 / MIB, ".2f"),
    ]
    if cuda:
        columns.append(Column("cuda_peak_bytes", "peak MiB/rank", 1 / MIB, ".1f"))
    return [
        *columns,
        Column("step_time_vs_base.median", "time/ddp fp32", 1.0, ".2f"),
        Column("state_vs_base", "state/ddp fp32", 1.0, ".2f"),
    ]


def _notes(result: dict[str, Any], cuda: bool) -> list[str]:
    batch, n = result["global_batch_size"], result["world_size"]
    skipped = [d for d in DTYPES if d not in result["dtypes"]]
    threads = result["threads"]
    notes = [
        f"every contender: the same model and global batch {batch}; ddp/fsdp: {n} workers x "
        f"{threads} thread(s);",
        f"  none: rank 0 alone with the whole batch and the same {threads} thread(s) "
        f"(a reference; the base is {BASE})",
        "time/ddp fp32: median of the per-round step time ratios (samples/s: the inverse); "
        "spreads in the JSON",
        "state MiB/rank: parameters + gradients + optimizer state + DDP's gradient buckets per "
        "rank,",
        "  from local tensor sizes (FSDP: its shards); no activations"
        + (
            ". peak MiB/rank: CUDA allocator peak over build + first steps"
            if cuda
            else " (CPU has no allocator statistics)"
        ),
    ]
    if not cuda:
        notes.append(
            "CPU autocast is fast only with hardware support (bf16: AVX512-BF16/AMX, "
            "fp16: AVX512-FP16/AMX-FP16)"
        )
    if skipped:
        notes.append(f"not measured (no autocast support on this device): {', '.join(skipped)}")
    return notes


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times, per_rank = result.pop("step_times"), result.pop("memory")
    rows = _rows(times, per_rank, result)
    cuda = "cuda_peak_bytes" in next(r for r in rows if r["name"] == BASE)
    return BenchReport(
        "strategies",
        {**result, "args": args.to_json()},
        rows,
        _columns(cuda),
        notes=_notes(result, cuda),
    )
