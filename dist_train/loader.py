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

from dist_train.config import DataConfig
from dist_train.data import BatchDataset, GlobalBatchSampler, MapDatasetAdapter
from dist_train.env import DistEnv
from dist_train.signals import PREEMPT_SIGNALS

Key = tuple[int, int, torch.Tensor, int]  # (step, micro-batch, indices, stream position)
Batch = tuple[int, int, torch.Tensor, torch.Tensor]  # (step, micro-batch, inputs, targets)


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
                yield step, i, chunk, step * batch + rank * (batch // world) + i * self.micro


class _Fetch(Dataset[Batch]):
    """A key in, a whole micro-batch out: datasets read batches at once (`get_batch`), so token
    windows stay one vectorized gather and map-style datasets are collated in the worker.

    A map-style sample is read with the RNGs seeded from (train.seed, split, its position in
    the stream): random augmentation is then the same for any number of loading workers, any
    world size and any resume point (a worker's own RNG is not in the checkpoint)."""

    def __init__(self, dataset: BatchDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __getitem__(self, key: Key) -> Batch:  # type: ignore[override]
        step, i, indices, first = key
        if isinstance(self.dataset, MapDatasetAdapter):
            seeds = [self.seed + p * 0x9E3779B1 for p in range(first, first + len(indices))]
            x, y = self.dataset.get_batch(indices, [s % 2**63 for s in seeds])
        else:
            x, y = self.dataset.get_batch(indices)
        return step, i, x, y

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
        self._loaders: dict[tuple[int, int | None], DataLoader[Batch]] = {}
        self._stream: Iterator[Batch] | None = None
        self._stream_range: tuple[int, int | None] = (-1, None)
        self._next = (-1, -1)  # the (step, micro-batch) the stream yields next

    def _loader(self, start: int, stop: int | None) -> DataLoader[Batch]:
        """One DataLoader per range, kept: persistent workers then serve every pass over a fixed
        range (evaluation) without being forked again."""
        if (start, stop) not in self._loaders:
            self._loaders[(start, stop)] = DataLoader(
                _Fetch(self.dataset, self.seed),
                sampler=StepSchedule(self.sampler, self.env, self.micro, start, stop),
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
        return self._loaders[(start, stop)]

    def iterate(self, start: int, stop: int | None) -> Iterator[Batch]:
        """Every micro-batch of steps [start, stop) (None: endless), in order, on the device."""
        if self.cfg.num_workers == 0:
            for step, i, chunk, _ in StepSchedule(self.sampler, self.env, self.micro, start, stop):
                x, y = self.dataset.get_batch(chunk)
                yield step, i, *self._to_device(x, y, pin=self.pin)
        else:
            for step, i, x, y in self._loader(start, stop):
                yield step, i, *self._to_device(x, y, pin=False)  # pinned by the loader

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
            self._stream, self._stream_range = self.iterate(step, None), (step, None)
            for _ in range(i):  # a start inside a step (the trainer never asks for one)
                next(self._stream)
        got_step, got_i, x, y = next(self._stream)
        per_step = self.sampler.global_batch_size // self.env.world_size // self.micro
        self._next = (got_step, got_i + 1) if got_i + 1 < per_step else (got_step + 1, 0)
        return x, y

    def _end_stream(self) -> None:
        self._stream = None
        if self._stream_range in self._loaders:
            self._shut(self._loaders.pop(self._stream_range))

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
