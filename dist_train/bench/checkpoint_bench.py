"""`bench checkpoint`: dist_train's Checkpointer (DCP; sync, async, load) against plain files
holding the same bytes (raw write/read, torch.save/load, each + fsync), an in-memory copy of the
state (what an async save must block for at least), a rate-limited writer that emulates slow
storage, and training steps/s while a background save runs.

The state is `DIST_TRAIN_BENCH_CKPT_PARAMS` fp32 parameters (default 1e8, 400 MB) of Linear
layers with plain SGD (no momentum: no optimizer tensors), on the CPU; the slow writer goes at
`DIST_TRAIN_BENCH_CKPT_SLOW_MBPS` (default 50) per worker. Files go under the temporary
directory (TMPDIR picks the disk).
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import torch

from dist_train.bench.ckpt_io import PlainFiles, linear_stack, throttle_dcp_writes
from dist_train.bench.ckpt_phases import (
    ASYNC,
    CLONE,
    COPY,
    DLOAD,
    RAW_INPLACE,
    RAW_R,
    RAW_W,
    SLOW_ASYNC,
    SLOW_SYNC,
    SYNC,
    TLOAD,
    TLOAD_SD,
    TRAIN,
    TRAIN_BG,
    TSAVE,
    VERIFY,
    io_phase,
    slow_phases,
)
from dist_train.bench.harness import BenchArgs, bench_config, run_workers
from dist_train.bench.loops import FrameworkLoop
from dist_train.bench.report import BenchReport, Column, machine_info
from dist_train.bench.stats import median, ratio_summary, round_medians, summarize
from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.files import complete_checkpoints
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.parallel.precision import Precision

PARAMS_ENV, RATE_ENV = "DIST_TRAIN_BENCH_CKPT_PARAMS", "DIST_TRAIN_BENCH_CKPT_SLOW_MBPS"
SLOW_PARAMS_PER_RANK = 16 * 2**20  # 64 MiB per worker: ~1.3 s per save at 50 MB/s


def env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ConfigError(name, raw, "expected a number") from None
    if not value > 0:
        raise ConfigError(name, raw, "must be > 0")
    return value


def check_config(cfg: RunConfig, nproc: int) -> None:
    """In the parent: the sizes parse, and the workers' memory fits (per worker: the model, a
    scratch copy, one transient copy: a clone, DCP's staging or torch.load's result)."""
    params = int(env_number(PARAMS_ENV, 1e8))
    env_number(RATE_ENV, 50.0)
    need, have = 3 * 4 * params * nproc, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * have:
        raise ConfigError(
            PARAMS_ENV,
            params,
            f"needs about {need / 1e9:.1f} GB of memory with "
            f"{nproc} worker(s); this machine has {have / 1e9:.1f} GB",
        )


def _checkpointed(
    cfg: RunConfig, env: DistEnv, params: int
) -> tuple[torch.nn.Module, Checkpointer]:
    model = linear_stack(params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # no momentum: no state tensors
    precision = Precision(cfg.precision, torch.device("cpu"))
    return model, Checkpointer(cfg, env, model, optimizer, precision)


def worker(args: BenchArgs, env: DistEnv) -> dict[str, Any]:
    params, rate = int(env_number(PARAMS_ENV, 1e8)), env_number(RATE_ENV, 50.0) * 1e6
    steps = itertools.count(1)  # a fresh step, hence a fresh folder, for every save

    def checkpointed(n: int, run: str) -> tuple[torch.nn.Module, Checkpointer]:
        return _checkpointed(bench_config(args, ["checkpoint.async_save=true"], run=run), env, n)

    model, ckpt = checkpointed(params, "ckpt")
    # Slow storage: a smaller state, so that a save at ~50 MB/s takes a second or two.
    slow_model, slow = checkpointed(min(params, SLOW_PARAMS_PER_RANK * env.world_size), "slow")
    loop = FrameworkLoop(bench_config(args, run="train"), env)
    torch.set_num_threads(args.threads)
    files = PlainFiles(Path(args.run_dir) / "plain", model, env, ckpt.cfg.checkpoint.keep_last)
    try:
        times, inner = io_phase(args, env, ckpt, files, steps)
        with throttle_dcp_writes(slow.root, rate):
            slow_times, slow_inner, window = slow_phases(args, env, slow, loop, steps)
    finally:  # every group goes before the process group does, on every rank alike
        loop.close()
        slow.close()
        ckpt.close()
    last = complete_checkpoints(ckpt.root)[-1]
    dcp_files = {str(p.relative_to(last)): p.stat().st_size for p in last.rglob("*") if p.is_file()}
    written = files.bytes_written()
    return {
        "times": {**times, **slow_times},
        "inner": {**inner, **slow_inner},
        "params": sum(p.numel() for p in model.parameters()),
        "layers": len(model),
        "state_bytes": files.scratch.numel(),
        "slow_state_bytes": sum(p.nbytes for p in slow_model.parameters()),
        "slow_rate_Bps": rate,
        "train_window_steps": window,
        "train_model": loop.trainer.cfg.model.name,
        "precision": loop.trainer.cfg.precision.dtype,
        "world_size": env.world_size,
        "threads": torch.get_num_threads(),
        "cold_reads": hasattr(os, "posix_fadvise"),
        "work_dir": args.run_dir,
        "dcp_files_bytes": dcp_files,
        "dcp_bytes_written": sum(dcp_files.values()),
        "raw_bytes_written": written["raw"],
        "torch_save_bytes_written": written["torch.save"],
        "machine": machine_info(),
    }


def _row(name: str, rounds: list[list[float]], payload: int = 0, steps: int = 0) -> dict[str, Any]:
    per_round = round_medians(rounds)
    row: dict[str, Any] = {
        "name": name,
        "time_s": summarize(per_round),
        "time_s_per_round": per_round,
        "op_times_s": rounds,
        "rate": "",
    }
    if payload:
        row["payload_bytes"] = payload
        row["GBps"] = summarize([payload / t / 1e9 for t in per_round])
        row["rate"] = f"{row['GBps']['median']:.2f} GB/s"
    if steps:
        row["steps_per_sec"] = summarize([steps / t for t in per_round])
        row["rate"] = f"{row['steps_per_sec']['median']:.1f} steps/s"
    return row


COLUMNS = [
    Column("time_s.median", "median ms", 1e3, ".1f"),
    Column("time_s.q1", "q1 ms", 1e3, ".1f"),
    Column("time_s.q3", "q3 ms", 1e3, ".1f"),
    Column("time_s.min", "min ms", 1e3, ".1f"),
    Column("rate", "rate"),
]
# The targets: label -> (bound, True when the ratio must be at least the bound).
TARGETS = {
    "sync save GB/s / slower of (raw write, torch.save), new files": (0.9, True),
    "dcp load GB/s / torch.load+load_state_dict GB/s": (0.9, True),
    "async blocking / memcopy (clone) time": (1.2, False),
    "slow storage: async blocking / sync save time": (0.1, False),
    "training steps/s with a background save / without": (0.9, True),
}


def _rows(
    times: dict[str, list[list[float]]], inner: dict[str, Any], result: dict[str, Any]
) -> list[dict[str, Any]]:
    size, slow = result["state_bytes"], result["slow_state_bytes"]
    rows = [
        _row(SYNC, times[SYNC], size),
        _row(f"{ASYNC}: blocking", inner[ASYNC]["blocking_s"]),
        _row(f"{ASYNC}: total", times[ASYNC], size),
    ]
    rows += [
        _row(name, times[name], size)
        for name in (RAW_W, RAW_INPLACE, TSAVE, CLONE, COPY, DLOAD, VERIFY, TLOAD, TLOAD_SD, RAW_R)
    ]
    rows += [
        _row(SLOW_SYNC, times[SLOW_SYNC], slow),
        _row(f"{SLOW_ASYNC}: blocking", inner[SLOW_ASYNC]["blocking_s"]),
        _row(f"{SLOW_ASYNC}: total", times[SLOW_ASYNC], slow),
    ]
    return rows + [
        _row(name, times[name], steps=result["train_window_steps"]) for name in (TRAIN, TRAIN_BG)
    ]


def _ratios(times: dict[str, list[list[float]]], inner: dict[str, Any]) -> dict[str, Any]:
    """Paired per round: every contender of a phase ran in every round."""
    m = {name: round_medians(rounds) for name, rounds in times.items()}
    block = round_medians(inner[ASYNC]["blocking_s"])
    slower = [max(a, b) for a, b in zip(m[RAW_W], m[TSAVE], strict=True)]
    pairs = [
        (slower, m[SYNC]),
        (m[TLOAD_SD], m[DLOAD]),
        (block, m[CLONE]),
        (round_medians(inner[SLOW_ASYNC]["blocking_s"]), m[SLOW_SYNC]),
        (m[TRAIN], m[TRAIN_BG]),
    ]
    ratios = {label: ratio_summary(a, b) for label, (a, b) in zip(TARGETS, pairs, strict=True)}
    ratios["async blocking / sync save time (local disk)"] = ratio_summary(block, m[SYNC])
    # Not targets, for reference: the disk's best case, and torch.load without the copy.
    ratios["sync save GB/s / raw write in place GB/s"] = ratio_summary(m[RAW_INPLACE], m[SYNC])
    # The slower of two noisy baselines per round leans slow (in DCP's favour): torch.save alone.
    ratios["sync save GB/s / torch.save (new file) GB/s"] = ratio_summary(m[TSAVE], m[SYNC])
    ratios["dcp load GB/s / torch.load (alone) GB/s"] = ratio_summary(m[TLOAD], m[DLOAD])
    # The checksums' cost: hashing during a save is inside the sync save's time; a resume
    # verifies the loaded files from the page cache after the load (its own row and ratio).
    ratios["checksum verify after a load / dcp load time"] = ratio_summary(m[VERIFY], m[DLOAD])
    return ratios


def run(args: BenchArgs) -> BenchReport:
    result = run_workers(worker, args)
    times, inner = result.pop("times"), result.pop("inner")
    size, slow_size = result["state_bytes"], result["slow_state_bytes"]
    window = result["train_window_steps"]
    ratios = _ratios(times, inner)
    checks = [
        f"{label.split(' /')[0]} {ratios[label]['median']:.3f} {'>=' if at_least else '<='} "
        f"{bound}: {'met' if (ratios[label]['median'] >= bound) == at_least else 'MISSED'}"
        for label, (bound, at_least) in TARGETS.items()
    ]
    tails = round_medians(inner[TRAIN_BG]["tail_s"])
    n = result["world_size"]
    notes = [
        f"state: {result['params']:,} fp32 params in {result['layers']} Linear layers = "
        f"{size / 1e9:.3f} GB, SGD without momentum; {n} worker(s) x {result['threads']} thread(s)",
        f"bytes written per save: dcp {result['dcp_bytes_written']:,} (shards + metadata + rng + "
        f"manifest), raw {result['raw_bytes_written']:,}, torch.save "
        f"{result['torch_save_bytes_written']:,}",
        "save GB/s = state bytes / time (each tensor written once over all workers); load and "
        "memcopy GB/s = state bytes / time on each worker (every worker holds the whole state)",
        "loads read from disk: each file's pages are dropped from the page cache before each load"
        if result["cold_reads"]
        else "loads read from the page cache (no posix_fadvise here)",
        f"slow storage: DCP writes at {result['slow_rate_Bps'] / 1e6:.0f} MB/s per worker, state "
        f"{slow_size / 1e6:.1f} MB; training: {result['train_model']} ({result['precision']}), "
        f"{window} steps per window; the background save ran on for a median "
        f"{median(tails):.2f} s after the window ({sum(t > 0.01 for t in tails)}/{len(tails)} "
        "rounds covered)",
        "targets (median of per-round ratios): " + "; ".join(checks),
    ]
    return BenchReport(
        "checkpoint",
        {**result, "args": args.to_json()},
        _rows(times, inner, result),
        COLUMNS,
        ratios=ratios,
        notes=notes,
    )
