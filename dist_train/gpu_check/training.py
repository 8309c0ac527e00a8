"""Training in this process through the library's own builders, as one worker of one."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.config.schema import RunConfig
from dist_train.data.datasets import DataSpec
from dist_train.launch.env import dist_session, read_env
from dist_train.parallel.wrap import unwrap
from dist_train.train.build import build_trainer
from dist_train.train.trainer import Trainer


class StopTraining(Exception):
    """Raised from a forward hook to cut a run short, as a crash or a kill would."""


@dataclass
class TrainRun:
    losses: dict[int, float]  # log step -> mean train loss of its interval
    records: list[dict[str, Any]]  # metrics.jsonl
    model: nn.Module  # the trained, unwrapped model (still on its device)
    spec: DataSpec
    staging: dict[str, Any] | None  # async checkpoint staging memory, when there is any
    wall_s: float


@contextmanager
def open_trainer(cfg: RunConfig) -> Iterator[Trainer]:
    """A built trainer, always closed. An empty environment: rank 0 of 1 even under torchrun."""
    env = read_env(cfg.train.device, environ={})
    with dist_session(env, cfg.parallel.timeout_s):
        trainer = build_trainer(cfg, env)
        try:
            yield trainer
        finally:
            trainer.close()


def train(cfg: RunConfig, stop_at: int | None = None) -> TrainRun:
    """`fit()`; with `stop_at=N` the run is interrupted right after step N (its saves stand)."""
    with open_trainer(cfg) as trainer:
        model = unwrap(trainer.model)
        if stop_at is not None:

            def stop(module: nn.Module, *_: Any) -> None:
                if trainer.state.step == stop_at and module.training:  # not in evaluation
                    raise StopTraining

            model.register_forward_pre_hook(stop)
        start = time.perf_counter()
        try:
            losses = trainer.fit().losses
        except StopTraining:
            losses = {}
        sync(trainer.env.device)
        wall_s = time.perf_counter() - start
        staging = staging_memory(trainer)  # before close() frees it
    records = read_metrics(Path(cfg.train.run_dir) / "metrics.jsonl")
    return TrainRun(losses, records, model, trainer.data.spec, staging, wall_s)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def staging_memory(trainer: Trainer) -> dict[str, Any] | None:
    """What the async stager keeps between saves: storages, bytes, how many page-locked.
    These are DCP internals (torch 2.13); when they move, the answer is None, not a failure."""
    stager = getattr(getattr(trainer.checkpointer, "_stager", None), "_state_dict_stager", None)
    cached = getattr(stager, "_cached_storage_mapping", None)
    if stager is None or cached is None:
        return None
    storages = list(cached.values())
    # DCP leaves storages under its size threshold unpinned on purpose (scalars, step counters)
    pinnable = [s for s in storages if s.nbytes() >= getattr(stager, "pin_memory_min_bytes", 1)]
    return {
        "staged_storages": len(storages),
        "staged_bytes": sum(s.nbytes() for s in storages),
        "pin_requested": bool(getattr(stager, "pin_memory", False)),
        "pinnable_storages": len(pinnable),
        "pinned_storages": sum(s.is_pinned() for s in pinnable),
    }


@contextmanager
def deterministic(strict: bool) -> Iterator[list[warnings.WarningMessage]]:
    """Deterministic kernels, the previous settings restored afterwards. Strict: an op without
    a deterministic kernel raises (flash attention's backward is deterministic only then);
    otherwise such ops run anyway and their warnings are recorded. cuBLAS also needs
    CUBLAS_WORKSPACE_CONFIG, read once at its first use: the CLI sets it at start-up."""
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
    )
    torch.use_deterministic_algorithms(True, warn_only=not strict)
    torch.backends.cudnn.deterministic = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.deterministic = before[2]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True)), default=0.0)


def weights_diff(a: nn.Module, b: nn.Module) -> tuple[bool, float]:
    """(bitwise equal, largest difference relative to the tensor's largest magnitude)."""
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return False, math.inf
    worst = 0.0
    for name, x in sa.items():
        y = sb[name].to(x.device)
        worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
    return all(torch.equal(x, sb[k].to(x.device)) for k, x in sa.items()), worst
