"""What a run will do, computed before any process starts: batch split, model size, memory."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from dist_train.checkpoint.files import check_compatible, check_files, read_manifest, resolve_resume
from dist_train.config.schema import SHARDED, RunConfig, accumulation_steps, micro_batch_size
from dist_train.data.build import build_data
from dist_train.data.datasets import Data, DataSpec
from dist_train.models.registry import build_model, count_parameters
from dist_train.parallel.memory import (
    Activations,
    MemoryEstimate,
    estimate,
    format_estimates,
    measure_activations,
)
from dist_train.parallel.precision import DTYPES
from dist_train.parallel.recompute import recomputed_units
from dist_train.parallel.wrap import resolve_strategy, shard_group_size
from dist_train.track.trackers import check_reachable
from dist_train.train.evaluation import build_metrics
from dist_train.train.lifecycle import done_line
from dist_train.train.loss import build_loss


@dataclass
class Plan:
    world_size: int
    device: str
    backend: str
    strategy: str
    micro_batch_size: int
    accumulation_steps: int
    global_batch_size: int
    train_samples: int
    val_samples: int
    parameters: int
    memory: list[MemoryEstimate]  # per rank, one per strategy this world size allows
    resume_from: str | None = None  # the checkpoint a run would continue from
    resume_step: int = 0
    notes: list[str] = field(default_factory=list)  # conditions the user should know about
    done: str | None = None  # the checkpoint leaves nothing to train: what to say instead

    @property
    def state_bytes_per_rank(self) -> float:
        """fp32 weights + grads + optimizer state on one rank under this run's strategy, at the
        peak of a step (gathered blocks included), before activations."""
        mine = next(m for m in self.memory if m.strategy == self.strategy)
        return mine.total - (mine.activations or 0.0)

    def format(self) -> str:
        return "\n".join(
            [
                "plan:",
                f"  world_size: {self.world_size} ({self.backend} on {self.device}, strategy {self.strategy})",
                f"  global_batch_size: {self.global_batch_size} = micro_batch_size {self.micro_batch_size}"
                f" x accumulation_steps {self.accumulation_steps} x world_size {self.world_size}",
                f"  data: {self.train_samples} train / {self.val_samples} validation samples",
                f"  parameters: {self.parameters:,} ({self.parameters / 1e6:.2f} M)",
                *format_estimates(self.memory, self.strategy, self.micro_batch_size),
                f"  resume: {f'step {self.resume_step} from {self.resume_from}' if self.resume_from else 'fresh start'}",
                *(f"  note: {note}" for note in self.notes),
            ]
        )


def device_kind(cfg: RunConfig) -> str:
    if cfg.train.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.train.device


def build_plan(cfg: RunConfig, world_size: int, local_world_size: int | None = None) -> Plan:
    """Validates everything that would otherwise fail inside the workers: batch split, data,
    model construction, sharding. The model is built on the meta device, so size costs no
    memory. `local_world_size`: workers per node (default: all on one)."""
    accum = accumulation_steps(cfg, world_size)
    strategy = resolve_strategy(cfg.parallel, world_size)
    shard_group_size(cfg.parallel, world_size, local_world_size or world_size)
    data = build_data(cfg)
    with torch.device("meta"):
        model = build_model(cfg.model, data.spec)
    recomputed_units(model, cfg.parallel)  # a model without blocks cannot recompute them
    check_before_writing(cfg, data.spec)
    device = device_kind(cfg)
    # train.overwrite starts over: the earlier run's checkpoints are set aside, not resumed.
    resume_from = None if cfg.train.overwrite else resolve_resume(cfg)
    resume_step, saved_world, done = 0, None, None
    if resume_from is not None:  # the checks workers would make, once and before they start
        manifest = read_manifest(resume_from)
        check_compatible(cfg, manifest, resume_from)
        check_files(manifest, resume_from)
        resume_step, saved_world = manifest["step"], manifest.get("world_size")
        done = done_line(cfg, resume_from, manifest)
    return Plan(
        world_size,
        device,
        "nccl" if device == "cuda" else "gloo",
        strategy,
        micro_batch_size(cfg, world_size),
        accum,
        cfg.train.global_batch_size,
        len(data.train),
        len(data.val) if data.val is not None else 0,
        count_parameters(model),
        estimates(cfg, model, data, world_size, local_world_size or world_size),
        str(resume_from) if resume_from else None,
        resume_step,
        dropout_notes(cfg, world_size, accum, saved_world),
        done,
    )


def estimates(
    cfg: RunConfig, model: nn.Module, data: Data, world_size: int, local_world_size: int
) -> list[MemoryEstimate]:
    """Per-rank memory under each strategy this world size allows (`none` alone for one
    worker), for this run's model, micro-batch, optimizer and precision."""
    micro = micro_batch_size(cfg, world_size)
    try:
        batch = data.train.get_batch(torch.arange(min(micro, len(data.train))))
        act: Activations | None = measure_activations(model, batch, build_loss(data.spec))
    except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError):
        act = None  # a forward that does not run on the meta device: activations unknown
    # Adam(W): two moments per parameter; SGD: a momentum buffer, if any.
    optimizer = 8 if cfg.optim.name != "sgd" else (4 if cfg.optim.momentum else 0)
    chosen = resolve_strategy(cfg.parallel, world_size)
    strategies = ["none"] if world_size == 1 else ["ddp", *SHARDED]
    rows = []
    for strategy in strategies:
        same = strategy == chosen  # the others keep this run's settings but shard_size
        p = cfg.parallel if same else replace(cfg.parallel, strategy=strategy, shard_size=0)
        shard = shard_group_size(p, world_size, local_world_size)
        rows.append(
            estimate(
                model, p, strategy, shard, act, optimizer, DTYPES[cfg.precision.dtype].itemsize
            )
        )
    return rows


def check_before_writing(cfg: RunConfig, spec: DataSpec) -> None:
    """What would otherwise fail only after the run directory was written: the user's metrics
    (built and checked to be metrics) and a remote tracking server that does not answer."""
    build_metrics(cfg, spec)
    check_reachable(cfg.log)


def dropout_notes(
    cfg: RunConfig, world_size: int, accum: int, saved_world: int | None
) -> list[str]:
    """Exactness across world sizes and accumulation holds only without dropout: each rank (and
    each micro-batch) draws its own masks, so the training differs by sampling noise."""
    dropout = cfg.model.dropout if not cfg.model._target_ else 0.0
    if dropout <= 0:
        return []
    notes = []
    if world_size > 1 or accum > 1:
        notes.append(
            f"model.dropout={dropout:g}: each rank draws its own dropout masks, so this "
            "run matches 1 worker without accumulation only statistically, not to "
            "float tolerance (set model.dropout=0 for exact equivalence)"
        )
    if saved_world is not None and saved_world != world_size:
        notes.append(
            f"model.dropout={dropout:g}: the checkpoint was written by {saved_world} "
            f"worker(s), this run has {world_size}; the data order continues unchanged "
            "but the dropout random streams start anew"
        )
    return notes
