"""The measured phases of `bench checkpoint`: saves, loads and copies of the large state, then
saves to slow storage and training with such a save in the background; the contenders' names.
"""

from __future__ import annotations

import itertools
import time
from pathlib import Path
from typing import Any

import torch

from dist_train.bench.ckpt_io import Figures, Op, PlainFiles, evict, measure_ops
from dist_train.bench.harness import BenchArgs, max_over_ranks
from dist_train.bench.loops import FrameworkLoop
from dist_train.bench.stats import median, round_medians
from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.checksums import damaged_files
from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.checkpoint.train_state import TrainState
from dist_train.launch.env import DistEnv

SYNC, ASYNC = "dcp save (sync)", "dcp async save"
RAW_W, RAW_INPLACE, TSAVE = (
    "raw write+fsync (new file)",
    "raw write+fsync (in place)",
    "torch.save+fsync (new file)",
)
CLONE, COPY = "memcopy (clone)", "memcopy (into buffer)"
DLOAD, TLOAD, TLOAD_SD, RAW_R = ("dcp load", "torch.load", "torch.load+load_state_dict", "raw read")
# What a resume adds after the load (the pages are in the page cache by then).
VERIFY = "checksum verify (after a load)"
SLOW_SYNC, SLOW_ASYNC, TRAIN, TRAIN_BG = (
    "slow dcp save (sync)",
    "slow dcp async save",
    "train",
    "train + bg save",
)

Times = dict[str, list[list[float]]]


def _async_op(ckpt: Checkpointer, steps: itertools.count[int]) -> Figures:
    """The real async path: `save` returns once the state is staged (the blocking part), then
    `wait` (the rest of the save and the commit) gives the total."""
    start = time.perf_counter()
    ckpt.save(TrainState(step=next(steps)), blocking=False)
    blocking = time.perf_counter() - start
    ckpt.wait()
    return {"blocking_s": blocking}


def _train_window(loop: FrameworkLoop, slow_save_s: float, env: DistEnv) -> int:
    """Steps per window: half the time of a slow save, so that a background save started just
    before the window is still running when it ends."""
    loop.run(2)  # the first steps allocate
    start = time.perf_counter()
    loop.run(3)
    step_s = max_over_ranks([(time.perf_counter() - start) / 3], env)[0]
    return max(2, min(1000, int(0.5 * slow_save_s / step_s)))


def _save_ops(ckpt: Checkpointer, files: PlainFiles, steps: itertools.count[int]) -> dict[str, Op]:
    """The saves and in-memory copies; each save goes to a fresh step (a fresh folder)."""
    return {
        SYNC: Op(lambda: ckpt.save(TrainState(step=next(steps)), blocking=True)),
        ASYNC: Op(lambda: _async_op(ckpt, steps)),
        RAW_W: Op(files.raw_write),
        RAW_INPLACE: Op(lambda: files.raw_write(in_place=True)),
        TSAVE: Op(files.torch_save),
        CLONE: Op(files.clone, finish=files.release),
        COPY: Op(files.copy_into_buffer),
    }


def _load_ops(ckpt: Checkpointer, files: PlainFiles) -> dict[str, Op]:
    """The loads (each from disk: the files' pages dropped first) and the checksum verify."""
    latest: list[Path] = []

    def before_load() -> None:
        latest[:] = [complete_checkpoints(ckpt.root)[-1]]
        evict([p for p in latest[0].rglob("*") if p.is_file()])

    def load_first() -> None:  # the state a resume verifies in: just loaded, pages cached
        before_load()
        ckpt.load(latest[0], TrainState())
        ckpt.check_verified()

    return {
        DLOAD: Op(
            lambda: ckpt.load(latest[0], TrainState()),
            prepare=before_load,
            finish=_verified(ckpt),
        ),
        VERIFY: Op(lambda: damaged_files(read_manifest(latest[0]), latest[0]), prepare=load_first),
        TLOAD: Op(
            files.torch_load, prepare=lambda: evict(files.all_files("pt")), finish=files.release
        ),
        TLOAD_SD: Op(
            lambda: files.torch_load(into_model=True),
            prepare=lambda: evict(files.all_files("pt")),
            finish=files.release,
        ),
        RAW_R: Op(files.raw_read, prepare=lambda: evict(files.all_files("raw"))),
    }


def io_phase(
    args: BenchArgs,
    env: DistEnv,
    ckpt: Checkpointer,
    files: PlainFiles,
    steps: itertools.count[int],
) -> tuple[Times, dict[str, Any]]:
    """Saves, loads and copies of the large state, all contenders interleaved."""
    # Something to read before any round, whatever the order and even with --warmup 0.
    ckpt.save(TrainState(step=next(steps)), blocking=True)
    files.raw_write()
    files.torch_save()
    # The saves first, then the loads: the same contender order as one table of them all.
    return measure_ops({**_save_ops(ckpt, files, steps), **_load_ops(ckpt, files)}, args, env)


def _verified(ckpt: Checkpointer) -> Any:
    def finish() -> None:
        ckpt.check_verified()  # untimed here: the row "checksum verify" shows its cost

    return finish


def slow_phases(
    args: BenchArgs,
    env: DistEnv,
    slow: Checkpointer,
    loop: FrameworkLoop,
    steps: itertools.count[int],
) -> tuple[Times, dict[str, Any], int]:
    """Sync and async saves to slow storage, then training with and without such a save
    running in the background: windows of training steps, the save started just before."""
    slow_times, slow_inner = measure_ops(
        {
            SLOW_SYNC: Op(lambda: slow.save(TrainState(step=next(steps)), blocking=True)),
            SLOW_ASYNC: Op(lambda: _async_op(slow, steps)),
        },
        args,
        env,
    )
    window = _train_window(loop, median(round_medians(slow_times[SLOW_SYNC])), env)

    def train() -> None:
        loop.run(window)
        if env.device.type == "cuda":
            torch.cuda.synchronize(env.device)

    def tail() -> Figures:  # how long the background save ran on after the window
        start = time.perf_counter()
        slow.wait()
        return {"tail_s": time.perf_counter() - start}

    def start_save() -> None:
        slow.save(TrainState(step=next(steps)), blocking=False)

    train_times, train_inner = measure_ops(
        {TRAIN: Op(train), TRAIN_BG: Op(train, prepare=start_save, finish=tail)}, args, env
    )
    return {**slow_times, **train_times}, {**slow_inner, **train_inner}, window
