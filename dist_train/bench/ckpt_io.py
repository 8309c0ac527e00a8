"""Pieces of `bench checkpoint`: the checkpointed model, plain-file baselines on the same bytes,
a rate-limited DCP writer that emulates slow storage, and a timing loop for whole operations.
"""

from __future__ import annotations

import gc
import itertools
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystem

from dist_train.bench.harness import BenchArgs, max_over_ranks
from dist_train.bench.stats import interleaved_order
from dist_train.checkpoint.files import fsync_dir
from dist_train.launch.env import DistEnv

Figures = dict[str, float]


def linear_stack(params: int) -> nn.Sequential:
    """About `params` fp32 parameters as square bias-free Linear layers of at most 2048 wide
    (16 MiB tensors: many tensors, as in a real model, not one huge buffer)."""
    width = min(2048, max(1, math.isqrt(params)))
    return nn.Sequential(
        *(nn.Linear(width, width, bias=False) for _ in range(max(1, round(params / width**2))))
    )


class ThrottledStream:
    """A file that takes writes at most `rate` bytes/s: each write sleeps until the bytes so far
    would have taken that long. The sleep releases the GIL, as a write blocked on a network
    file system does, so a background save competes for the cores as it would there."""

    def __init__(
        self,
        stream: Any,
        rate: float,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._stream, self._rate, self._clock, self._sleep = stream, rate, clock, sleep
        self._start, self.written = clock(), 0

    def write(self, data: Any) -> int:
        n = self._stream.write(data)
        self.written += memoryview(data).nbytes
        delay = self._start + self.written / self._rate - self._clock()
        if delay > 0:
            self._sleep(delay)
        return n

    def __getattr__(self, name: str) -> Any:  # tell, fileno (fsync), flush, close ...
        return getattr(self._stream, name)


@contextmanager
def throttle_dcp_writes(root: Path, rate: float) -> Iterator[None]:
    """DCP's writes (shards and metadata) of checkpoints under `root` go at `rate` bytes/s, on
    each worker. Checkpointer has no storage-writer hook, so DCP's FileSystem is patched in
    this (benchmark worker) process only, and only for paths under `root`."""
    original = FileSystem.create_stream

    @contextmanager
    def create_stream(self: FileSystem, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with original(self, path, mode) as stream:
            slow = "w" in mode and Path(path).resolve().is_relative_to(root.resolve())
            yield ThrottledStream(stream, rate) if slow else stream

    FileSystem.create_stream = create_stream  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        FileSystem.create_stream = original  # type: ignore[method-assign]


def evict(paths: Sequence[Path]) -> None:
    """Drop these files' (clean, fsynced) pages from the page cache, so that the next read comes
    from the disk. Per file, unlike `echo 3 > /proc/sys/vm/drop_caches`: no root, and nothing
    else on the machine loses its cache. No-op where posix_fadvise is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


class PlainFiles:
    """The same tensors through plain files, the baselines. Each rank writes its share (what DCP
    writes too: replicated tensors once over all ranks), raw or with torch.save, + fsync; every
    rank reads all shares back, as every rank reads the whole state on resume.

    A save writes a new file and then deletes the one from `keep` saves ago: the lifecycle of a
    checkpoint that never loses the previous one (the Checkpointer's too: a new folder per save,
    older ones deleted once it is complete), so that every contender allocates and frees disk
    blocks alike. `raw_write(in_place=True)` truncates and rewrites one file instead: the disk's
    best case, which no crash-safe save can use."""

    def __init__(self, root: Path, model: nn.Module, env: DistEnv, keep: int = 1) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.model, self.env, self.keep = root, model, env, keep
        self.tensors = {k: t.detach() for k, t in model.state_dict().items()}
        names = sorted(self.tensors)  # the same split on every rank
        self.share = {n: self.tensors[n] for n in names[env.rank :: env.world_size]}
        # One preallocated buffer of the whole state: copies and raw reads land here, so that
        # their figures are memory and disk speed, not page faults of fresh allocations.
        self.scratch = torch.empty(sum(t.nbytes for t in self.tensors.values()), dtype=torch.uint8)
        self._held: list[Any] = []  # results kept until after the timer, freed untimed
        # Save numbers per kind; every rank runs the same operations in the same order, so the
        # newest number of a kind is the same on all ranks.
        self._saves: dict[str, list[int]] = {"raw": [], "pt": []}
        self._count = itertools.count()

    def path(self, kind: str, rank: int, save: int | None = None) -> Path:
        """A rank's file of the newest save of this kind, or of save number `save`."""
        number = self._saves[kind][-1] if save is None else save
        return self.root / f"{kind}_rank{rank}_{number:06d}.bin"

    def all_files(self, kind: str) -> list[Path]:
        return [self.path(kind, r) for r in range(self.env.world_size)]

    @contextmanager
    def _new_file(self, kind: str, buffering: int = -1) -> Iterator[Any]:
        """A new file for this rank's share, fsynced (and its folder entry) once written; then
        the file from `keep` saves ago goes."""
        number = next(self._count)
        path = self.path(kind, self.env.rank, number)
        with open(path, "wb", buffering=buffering) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.root)
        self._saves[kind].append(number)
        for old in self._saves[kind][: -self.keep]:
            self.path(kind, self.env.rank, old).unlink()
        del self._saves[kind][: -self.keep]

    def _write_share(self, f: Any) -> None:
        for t in self.share.values():
            view = memoryview(t.numpy()).cast("B")  # the tensor's own memory: no copy
            while view:
                view = view[f.write(view) :]

    def raw_write(self, in_place: bool = False) -> None:
        if not in_place:
            with self._new_file("raw", buffering=0) as f:
                self._write_share(f)
            return
        with open(self.root / f"inplace_rank{self.env.rank}.bin", "wb", buffering=0) as f:
            self._write_share(f)
            os.fsync(f.fileno())

    def torch_save(self) -> None:
        with self._new_file("pt") as f:
            torch.save(self.share, f)

    def raw_read(self) -> None:
        view, offset = memoryview(self.scratch.numpy()), 0
        for path in self.all_files("raw"):
            with open(path, "rb", buffering=0) as f:
                while n := f.readinto(view[offset:]):
                    offset += n

    def torch_load(self, into_model: bool = False) -> None:
        """torch.load of every share; with `into_model`, what a resume does with them: the
        model's `load_state_dict` (a copy into its parameters)."""
        self._held = [torch.load(p, weights_only=True) for p in self.all_files("pt")]
        if into_model:
            self.model.load_state_dict({k: v for share in self._held for k, v in share.items()})

    def clone(self) -> None:
        """What a snapshot for a background save needs at least: a copy of every tensor."""
        self._held = [t.clone() for t in self.tensors.values()]

    def copy_into_buffer(self) -> None:
        """The same copy into memory allocated once: the memory-bandwidth floor."""
        offset = 0
        for t in self.tensors.values():
            self.scratch[offset : offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
            offset += t.nbytes

    def release(self) -> None:
        self._held = []

    def bytes_written(self) -> dict[str, int]:
        return {
            "raw": sum(p.stat().st_size for p in self.all_files("raw")),
            "torch.save": sum(p.stat().st_size for p in self.all_files("pt")),
        }


def _nothing() -> None:
    return None


@dataclass
class Op:
    """One contender's operation: `run` is timed (it may return inner figures in seconds, such
    as the blocking part of an async save); `prepare` and `finish` are not."""

    run: Callable[[], Figures | None]
    prepare: Callable[[], None] = _nothing
    finish: Callable[[], Figures | None] = _nothing


def _barrier(env: DistEnv) -> None:
    max_over_ranks([0.0], env)


def _once(op: Op, env: DistEnv) -> tuple[float, Figures]:
    # Barriers around `prepare`: no rank evicts a file while another still reads it, and the
    # ranks start together, so the slowest rank's time is the operation's time.
    _barrier(env)
    op.prepare()
    _barrier(env)
    start = time.perf_counter()
    inner = op.run() or {}
    elapsed = time.perf_counter() - start
    return elapsed, {**inner, **(op.finish() or {})}


def measure_ops(
    ops: Mapping[str, Op], args: BenchArgs, env: DistEnv
) -> tuple[dict[str, list[list[float]]], dict[str, dict[str, list[list[float]]]]]:
    """Like `harness.measure_interleaved`, for operations that need untimed work around them:
    `warmup` operations each, then `repeats` rotating rounds of `steps` operations. Returns the
    seconds per operation (max over ranks) and the inner figures (max over ranks), per round."""
    for op in ops.values():
        for _ in range(args.warmup):
            _once(op, env)
    times: dict[str, list[list[float]]] = {name: [] for name in ops}
    inner: dict[str, dict[str, list[list[float]]]] = {name: {} for name in ops}
    for order in interleaved_order(list(ops), args.repeats):
        for name in order:
            gc.collect(1)
            results = [_once(ops[name], env) for _ in range(args.steps)]
            keys = sorted(results[0][1])
            flat = max_over_ranks(
                [t for t, _ in results] + [figs[k] for k in keys for _, figs in results], env
            )
            n = args.steps
            times[name].append(flat[:n])
            for i, key in enumerate(keys, start=1):
                inner[name].setdefault(key, []).append(flat[i * n : (i + 1) * n])
    return times, inner
