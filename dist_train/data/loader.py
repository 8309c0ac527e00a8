"""This rank's micro-batches, step after step: on the training thread, or from DataLoader worker
processes that build them ahead while the model trains.

Either way the batches are the same: the world-size-invariant `GlobalBatchSampler` picks each
step's global batch, this rank takes its slice, and the slice is cut into micro-batches. The
workers are driven by that schedule itself (a sampler of (step, micro-batch, indices)), so a
run that resumes at step s starts its loader at step s: nothing earlier is replayed.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from itertools import count
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dist_train.config.schema import DataConfig
from dist_train.data.datasets import BatchDataset, MapDatasetAdapter
from dist_train.data.sampler import GlobalBatchSampler
from dist_train.launch.env import DistEnv
from dist_train.launch.signals import PREEMPT_SIGNALS

# (step, micro-batch, indices, stream position of the first, how many are real: the rest pad)
Key = tuple[int, int, torch.Tensor, int, int]
Batch = tuple[int, int, torch.Tensor, torch.Tensor, int]  # (step, micro, inputs, targets, real)


class StepSchedule(Sampler[Key]):
    """Steps [start, stop) (stop None: endless): this rank's slice of each global batch, in
    micro-batches."""

    def __init__(
        self, sampler: GlobalBatchSampler, env: DistEnv, micro: int, start: int, stop: int | None
    ) -> None:
        self.sampler, self.env, self.micro = sampler, env, micro
        self.start, self.stop = start, stop

    def __iter__(self) -> Iterator[Key]:
        batch, world, rank = self.sampler.global_batch_size, self.env.world_size, self.env.rank
        for step in range(self.start, self.stop) if self.stop is not None else count(self.start):
            indices = self.sampler.rank_indices(step, rank, world)
            for i, chunk in enumerate(indices.split(self.micro)):
                # Where the micro-batch's first sample sits in the run's stream of samples:
                # the same at any world size and for any resume point.
                first = step * batch + rank * (batch // world) + i * self.micro
                yield step, i, chunk, first, len(chunk)


class EverySampleOnce(Sampler[Key]):
    """Samples 0..n-1 in order, each exactly once, in global batches split across ranks. The
    last, partial batch gives every rank the same number of samples (so that every rank runs
    the same forward passes: FSDP gathers parameters in each), padded with repeats of the
    batch's first sample that `real` tells the metrics to leave out."""

    def __init__(self, num_samples: int, global_batch: int, env: DistEnv, micro: int) -> None:
        self.n, self.batch, self.env, self.micro = num_samples, global_batch, env, micro

    def __iter__(self) -> Iterator[Key]:
        world, rank = self.env.world_size, self.env.rank
        for step, start in enumerate(range(0, self.n, self.batch)):
            size = min(self.batch, self.n - start)
            share = -(-size // world)  # per rank, rounded up
            lo, hi = start + min(rank * share, size), start + min((rank + 1) * share, size)
            indices = torch.arange(lo, hi)
            padded = torch.cat([indices, torch.full((share - len(indices),), start)])
            for i, chunk in enumerate(padded.split(self.micro)):
                real = min(max(hi - lo - i * self.micro, 0), len(chunk))
                yield step, i, chunk, lo + i * self.micro, real


class _Fetch(Dataset[Batch]):
    """A key in, a whole micro-batch out: datasets read batches at once (`get_batch`), so token
    windows stay one vectorized gather and map-style datasets are collated in the worker.

    A map-style sample is read with the RNGs seeded from (train.seed, split, its position in
    the stream): random augmentation is then the same for any number of loading workers, any
    world size and any resume point (a worker's own RNG is not in the checkpoint)."""

    def __init__(self, dataset: BatchDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: Key) -> Batch:  # type: ignore[override]
        step, i, indices, first, real = key
        if isinstance(self.dataset, MapDatasetAdapter):
            seeds = [self.seed + p * 0x9E3779B1 for p in range(first, first + len(indices))]
            x, y = self.dataset.get_batch(indices, [s % 2**63 for s in seeds])
        else:
            x, y = self.dataset.get_batch(indices)
        return step, i, x, y, real

    def __len__(self) -> int:
        return len(self.dataset)


def _ignore_stop_signals(worker_id: int) -> None:
    """Schedulers signal every process of a job (SLURM's --signal, a process-group kill): the
    stop is the training process's to handle, at a log step, with a save that still needs
    batches. It shuts its loading workers down itself afterwards."""
    for signum in PREEMPT_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def pin_memory(cfg: DataConfig, device: torch.device) -> bool:
    return cfg.pin_memory == "true" or (cfg.pin_memory == "auto" and device.type == "cuda")


class BatchLoader:
    """One split's micro-batches for this rank. `num_workers=0` builds each one when asked, on
    the training thread (no processes, no queue: the cheapest path for in-memory data)."""

    def __init__(
        self,
        dataset: BatchDataset,
        global_batch_size: int,
        seed: int,
        env: DistEnv,
        micro: int,
        cfg: DataConfig,
        split: str = "train",
    ) -> None:
        self.dataset, self.env, self.micro, self.cfg = dataset, env, micro, cfg
        self.sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed)
        self.seed = seed * 1_000_003 + (split != "train")  # per-sample seeds differ by split
        self.pin = pin_memory(cfg, env.device)
        self._loaders: dict[tuple[Any, ...], DataLoader[Batch]] = {}
        self._stream: Iterator[Batch] | None = None
        self._stream_key: tuple[Any, ...] = ()
        self._next = (-1, -1)  # the (step, micro-batch) the stream yields next

    def _loader(self, key: tuple[Any, ...], schedule: Sampler[Key]) -> DataLoader[Batch]:
        """One DataLoader per schedule, kept: persistent workers then serve every pass over a
        fixed schedule (evaluation) without being forked again."""
        if key not in self._loaders:
            self._loaders[key] = DataLoader(
                _Fetch(self.dataset, self.seed),
                sampler=schedule,
                batch_size=None,  # the keys are whole micro-batches already
                num_workers=self.cfg.num_workers,
                pin_memory=self.pin,
                prefetch_factor=self.cfg.prefetch_factor,
                persistent_workers=self.cfg.persistent_workers,
                # The workers' base seed comes from here, not from the global RNG: starting a
                # loader must not shift the model's dropout masks.
                generator=torch.Generator().manual_seed(0),
                worker_init_fn=_ignore_stop_signals,
            )
        return self._loaders[key]

    def _run(self, key: tuple[Any, ...], schedule: Sampler[Key]) -> Iterator[Batch]:
        if self.cfg.num_workers == 0:
            for step, i, chunk, _, real in schedule:
                x, y = self.dataset.get_batch(chunk)
                yield step, i, *self._to_device(x, y, pin=self.pin), real
        else:
            for step, i, x, y, real in self._loader(key, schedule):
                yield step, i, *self._to_device(x, y, pin=False), real  # pinned by the loader

    def iterate(self, start: int, stop: int | None) -> Iterator[Batch]:
        """Every micro-batch of steps [start, stop) (None: endless), in order, on the device."""
        schedule = StepSchedule(self.sampler, self.env, self.micro, start, stop)
        return self._run(("steps", start, stop), schedule)

    def every_sample_once(self) -> Iterator[Batch]:
        """The whole split in order, each sample once (see `EverySampleOnce`)."""
        n, batch = len(self.dataset), self.sampler.global_batch_size
        return self._run(("once",), EverySampleOnce(n, batch, self.env, self.micro))

    def _to_device(
        self, x: torch.Tensor, y: torch.Tensor, pin: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.env.device.type != "cuda":
            return x, y
        if pin:
            x, y = x.pin_memory(), y.pin_memory()
        return (
            x.to(self.env.device, non_blocking=True),
            y.to(self.env.device, non_blocking=True),
        )

    def get(self, step: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch i of `step`. Training asks in order, so this reads one endless stream
        (loading workers run ahead of it); anything else (the first call, a resume) starts a new
        stream at `step`."""
        if self._stream is None or self._next != (step, i):
            self._end_stream()
            self._stream, self._stream_key = self.iterate(step, None), ("steps", step, None)
            for _ in range(i):  # a start inside a step (the trainer never asks for one)
                next(self._stream)
        got_step, got_i, x, y, _ = next(self._stream)
        per_step = self.sampler.global_batch_size // self.env.world_size // self.micro
        self._next = (got_step, got_i + 1) if got_i + 1 < per_step else (got_step + 1, 0)
        return x, y

    def _end_stream(self) -> None:
        self._stream = None
        if self._stream_key in self._loaders:
            self._shut(self._loaders.pop(self._stream_key))

    def close(self) -> None:
        """Stop every worker process now, not at interpreter exit."""
        self._stream = None
        for loader in self._loaders.values():
            self._shut(loader)
        self._loaders.clear()

    @staticmethod
    def _shut(loader: DataLoader[Any]) -> None:
        iterator = getattr(loader, "_iterator", None)  # persistent workers live here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        loader._iterator = None  # type: ignore[attr-defined]
