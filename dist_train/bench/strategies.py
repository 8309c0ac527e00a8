"""`bench strategies`: the same model and batch under ddp, zero2, fsdp and hsdp, each with
activation checkpointing off and on, each beside a hand-written loop of the same strategy, all
interleaved in the same N processes: step time (vs DDP and vs its hand-written twin), peak
memory per rank, activation memory, and the plan's estimate of that peak. With one worker
(`none` only) the same table holds `none` with and without activation checkpointing.

Memory is measured, not summed: on CPU glibc's bytes in use, read after every aten op while a
contender is built and runs its first (untimed) steps; on CUDA the allocator's peak. The table,
its notes and the goals they are held against are in strategy_table.py.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from dist_train.bench.harness import (
    BenchArgs,
    bench_config,
    max_over_ranks,
    measure_interleaved,
    run_workers,
)
from dist_train.bench.loops import FrameworkLoop, RawLoop, max_param_diff, training_settings
from dist_train.bench.memory_meter import MemoryMeter
from dist_train.bench.report import BenchReport
from dist_train.bench.strategy_contender import PROBE_STEPS, Contender, Loop, parts
from dist_train.bench.strategy_table import (
    HAND,
    Planned,
    columns,
    goals,
    notes,
    plan_rows,
    table_rows,
)
from dist_train.config.schema import RunConfig
from dist_train.data.datasets import Data
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.registry import build_model
from dist_train.train.plan import estimates


def check_config(cfg: RunConfig, nproc: int) -> None:
    """Settings the hand-written twins do not have, or that would make rows do different work:
    DDP's compression hooks (FSDP rows cannot), compile, and host offload (DDP rows cannot)."""
    for key, value, valid in (
        ("parallel.grad_compression", cfg.parallel.grad_compression, "none"),
        ("train.compile", cfg.train.compile, False),
        ("parallel.cpu_offload", cfg.parallel.cpu_offload, False),
    ):
        if value != valid:
            raise ConfigError(
                key,
                value,
                f"this benchmark compares strategies without it; use {str(valid).lower()}",
            )


def _build(args: BenchArgs, env: DistEnv, meter: MemoryMeter, built: dict[str, Contender]) -> None:
    """Fill `built` as each contender is built (the caller closes whatever was built, even
    when a later build fails). Every rank builds in the same order: DDP's broadcast, FSDP's
    meshes and the checkpointer's group are collectives."""
    steps = args.total_steps + PROBE_STEPS  # the twin's batches: as many as it will run
    for row in plan_rows(bench_config(args), env.world_size):
        cfg = bench_config(args, row.overrides, run=row.name.replace(" ", "_"))
        framework = Contender(partial(FrameworkLoop, cfg, env), env, meter)
        built[row.name] = framework
        loop = framework.loop
        assert isinstance(loop, FrameworkLoop)  # just built as one
        twin = partial(RawLoop, loop.trainer.cfg, env, loop.data, steps)
        built[row.name + HAND] = Contender(twin, env, meter)


def _local(loop: Loop) -> list[torch.Tensor]:
    """Parameters as this rank holds them (FSDP2: its shards), for a comparison that needs no
    collective of DTensor's own between two meshes."""
    return [p.to_local() if hasattr(p, "to_local") else p for p in parts(loop)[1].parameters()]


def _same_work(built: dict[str, Contender], rows: list[Planned], env: DistEnv) -> dict[str, float]:
    """Largest parameter difference, over ranks, between each row and its twin after the
    benchmark: near zero shows they did the same work, step for step."""
    local = [
        max_param_diff(_local(built[r.name].loop), _local(built[r.name + HAND].loop)) for r in rows
    ]
    return dict(zip([r.name for r in rows], max_over_ranks(local, env), strict=True))


def _estimates(cfg: RunConfig, data: Data, env: DistEnv) -> dict[str, dict[str, Any]]:
    """The plan's per-rank estimate for each row (`dist-train check` prints the same), from the
    model on the meta device: no memory, no compute."""
    with torch.device("meta"):
        model = build_model(cfg.model, data.spec)
    out = {}
    for row in plan_rows(cfg, env.world_size):
        # The row's own strategy as the chosen one: its settings (shard_size) are kept.
        parallel = dataclasses.replace(
            cfg.parallel, strategy=row.strategy, activation_checkpointing=row.checkpointing
        )
        for e in estimates(
            dataclasses.replace(cfg, parallel=parallel),
            model,
            data,
            env.world_size,
            env.local_world_size,
        ):
            if e.strategy == row.strategy:
                out[row.name] = {**dataclasses.asdict(e), "total": e.total}
    return out


def _gather(memory: dict[str, Any], env: DistEnv) -> list[dict[str, Any]]:
    if not env.is_distributed:
        return [memory]
    per_rank: list[dict[str, Any]] = [{} for _ in range(env.world_size)]
    dist.all_gather_object(per_rank, memory)
    return per_rank


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    meter = MemoryMeter(env.device)
    built: dict[str, Contender] = {}
    rows = plan_rows(bench_config(args), env.world_size)
    try:
        torch.set_num_threads(args.threads)  # the same for every contender
        _build(args, env, meter, built)
        times = measure_interleaved({n: c.loop.run for n, c in built.items()}, args, env)
        memory = {name: c.figures() for name, c in built.items()}
        diffs = _same_work(built, rows, env)
        first = built[rows[0].name].loop
        assert isinstance(first, FrameworkLoop)
        data, settings = first.data, training_settings(first.trainer.cfg, env, first)
    finally:  # every DDP wrapper goes before the process group does
        for c in built.values():
            c.loop.close()
    del settings["strategy"]  # each row's is its own
    return {
        "step_times": times,
        "memory": _gather(memory, env),
        "estimates": _estimates(bench_config(args), data, env) if env.is_main else {},
        "max_param_diff": diffs,
        "rows": [dataclasses.asdict(r) for r in rows],
        "memory_source": meter.source,
        "threads": torch.get_num_threads(),
        "local_world_size": env.local_world_size,
        "shard_size": first.trainer.cfg.parallel.shard_size,
        **settings,
    }


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    rows = table_rows(result)
    for key in ("step_times", "memory"):
        result.pop(key)
    return BenchReport(
        "strategies",
        {**result, "goals": goals(result, rows), "args": args.to_json()},
        rows,
        columns(result),
        notes=notes(result, rows),
    )
