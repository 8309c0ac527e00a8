"""The `strategies` check: the table of `dist-train bench strategies` (ddp, zero2, fsdp, hsdp,
each with activation checkpointing off and on, each beside its hand-written loop) on the GPUs,
one worker per GPU over NCCL. It drives the CLI as a user runs it (bench and gpu_check are
separate tools: neither imports the other), prints the table, and keeps its rows, ratios and
goals in the JSON. The goals are the CPU machines' (issue #23): recorded here, not a verdict.
With `--device cpu`: 2 gloo workers on a tiny model. `--steps-scale` leaves its rounds alone."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

import torch

from dist_train.gpu_check.runner import CheckFailed, CheckSkipped, Context, run_tool
from dist_train.gpu_check.train_checks import quickstart_path

TIMEOUT_S = 600
# A GPT-2-small-sized model, bf16, 8 x 1024 tokens per rank: activations that matter next to
# 124 M parameters' state. Rounds: (--steps, --warmup, --repeats).
GPU_SIZES = (
    "precision.dtype=bf16",
    "model.n_layer=12",
    "model.n_head=12",
    "model.n_embd=768",
    "model.block_size=1024",
    "train.micro_batch_size=8",
)
GPU_ROUNDS = (5, 2, 4)
CPU_SIZES = (
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "data.max_chars=20000",
    "train.micro_batch_size=4",
)
CPU_ROUNDS = (1, 1, 2)


def workers(ctx: Context) -> int:
    """One per GPU (NCCL refuses two ranks on one device); two on the CPU."""
    if ctx.device.type != "cuda":
        return 2
    count = torch.cuda.device_count()
    if count < 2:
        raise CheckSkipped(
            f"needs 2 or more GPUs: the strategies shard over workers and NCCL runs one worker "
            f"per GPU ({count} visible)"
        )
    return count


def bench_command(ctx: Context, nproc: int) -> list[str]:
    cuda = ctx.device.type == "cuda"
    steps, warmup, repeats = GPU_ROUNDS if cuda else CPU_ROUNDS
    return [
        sys.executable,
        "-m",
        "dist_train",
        "bench",
        "strategies",
        str(quickstart_path(ctx)),
        *("--nproc", str(nproc), "--steps", str(steps), "--warmup", str(warmup)),
        *("--repeats", str(repeats), "--out", str(ctx.work_dir / "strategies.json")),
        f"train.device={ctx.device.type}",
        f"train.global_batch_size={(8 if cuda else 4) * nproc}",
        *(GPU_SIZES if cuda else CPU_SIZES),
    ]


def _compact(row: dict[str, Any]) -> dict[str, Any]:
    mib = 2**20
    return {
        "step_ms": 1e3 * row["step_time_s"]["median"],
        "time_vs_base": row["step_time_vs_base"]["median"],
        "time_vs_hand": row["step_time_vs_hand"]["median"],
        "peak_mib": row["peak_bytes"] / mib if row["peak_bytes"] is not None else None,
        "peak_vs_base": row["peak_vs_base"],
        "activation_mib": (
            row["activation_bytes"] / mib if row["activation_bytes"] is not None else None
        ),
        "estimate_vs_peak": row["estimate_vs_peak"],
    }


def read_table(data: dict[str, Any], cuda: bool, numbers: dict[str, Any]) -> str:
    """The rows' figures into `numbers`; fails on a figure that is not a positive number."""
    settings = data["settings"]
    rows = {r["name"]: _compact(r) for r in data["results"]}
    numbers.update(rows=rows, goals=settings["goals"], memory_source=settings["memory_source"])
    if cuda and settings["memory_source"] != "cuda allocator":
        raise CheckFailed(f"memory read from {settings['memory_source']}, not the CUDA allocator")
    # Without an allocator to read (no glibc, CPU only) there is no activation figure.
    optional = {"activation_mib"} if settings["memory_source"] is None else set()
    for name, row in rows.items():
        bad = [
            k
            for k, v in row.items()
            if k not in optional and not (isinstance(v, float | int) and math.isfinite(v))
        ]
        bad += [k for k in ("step_ms", "time_vs_hand", "peak_mib") if not (row[k] or 0) > 0]
        if bad:
            raise CheckFailed(f"{name}: {', '.join(sorted(set(bad)))} not a positive number")
    goals = [g["met"] for kind in settings["goals"].values() for g in kind.values()]
    sharded = ", ".join(
        f"{n} {v['peak_vs_ddp']:.2f}" for n, v in settings["goals"]["sharded_peak"].items()
    )
    return (
        f"{len(rows)} rows on {settings['world_size']} workers; peak/ddp {sharded}; "
        f"goals met {sum(g is True for g in goals)}/{len(goals)}"
    )


def strategies_check(ctx: Context, numbers: dict[str, Any]) -> str:
    nproc = workers(ctx)
    cmd = bench_command(ctx, nproc)
    numbers.update(nproc=nproc, command=" ".join(cmd[1:]))
    proc = run_tool(cmd, "bench strategies", TIMEOUT_S)
    print(proc.stdout, end="", flush=True)  # the table, for whoever watches
    numbers["exit_status"] = proc.returncode
    if proc.returncode:
        numbers["output_tail"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        raise CheckFailed(
            f"bench strategies exited {proc.returncode}: {lines[-1] if lines else ''}"
        )
    data = json.loads((ctx.work_dir / "strategies.json").read_text())
    numbers["table"] = proc.stdout
    return read_table(data, ctx.device.type == "cuda", numbers)
