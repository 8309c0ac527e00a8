"""Builds a Trainer from config: data, model (the same init on every rank), optimizer,
checkpointer, logger; resumes from a checkpoint and writes the resolved config."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.files import read_manifest, resolve_resume
from dist_train.checkpoint.train_state import TrainState
from dist_train.config.load import save_config
from dist_train.config.schema import RunConfig, accumulation_steps, micro_batch_size
from dist_train.data.build import build_data
from dist_train.data.datasets import Data, DataSpec
from dist_train.errors import DistTrainError, PeerError
from dist_train.launch.env import DistEnv, all_agree, restart_count
from dist_train.launch.faults import Fault
from dist_train.launch.signals import StopRequest
from dist_train.launch.watch import Progress
from dist_train.models.protocol import flops_per_token, fsdp_units
from dist_train.models.registry import build_model
from dist_train.parallel.precision import Precision
from dist_train.parallel.recompute import apply_activation_checkpointing
from dist_train.parallel.wrap import settle_buckets, wrap_model
from dist_train.track.metrics import MetricsLogger, peak_flops, trim_metrics
from dist_train.track.trackers import build_trackers
from dist_train.train.evaluation import known_metric_names
from dist_train.train.loss import build_loss
from dist_train.train.optim import build_optimizer, decay_horizon
from dist_train.train.plan import check_before_writing
from dist_train.train.selection import check_watched
from dist_train.train.summary import init_weights, model_facts, run_facts
from dist_train.train.trainer import Trainer


def with_schedule_horizon(cfg: RunConfig, saved: dict[str, Any] | None) -> RunConfig:
    """The config with optim.decay_steps resolved: as set, else the checkpoint's horizon (a
    resume never re-stretches the schedule), else this run's max_steps. The resolved value is
    what config.yaml and every manifest record."""
    if cfg.optim.decay_steps:
        horizon = cfg.optim.decay_steps
    elif saved is not None:
        optim, train = saved["config"]["optim"], saved["config"]["train"]
        horizon = decay_horizon_from(optim, train)
    else:
        horizon = decay_horizon(cfg.optim, cfg.train.max_steps)
    return replace(cfg, optim=replace(cfg.optim, decay_steps=horizon))


def decay_horizon_from(optim: dict[str, Any], train: dict[str, Any]) -> int:
    """A manifest's horizon (manifests written before decay_steps existed used max_steps)."""
    return int(optim.get("decay_steps") or train["max_steps"])


def resume_notes(cfg: RunConfig, saved: dict[str, Any]) -> list[str]:
    """One line for each setting that a resume continues differently than a user may expect."""
    notes = []
    if cfg.optim.schedule == "cosine" and cfg.optim.decay_steps < cfg.train.max_steps:
        notes.append(
            f"lr schedule: the cosine keeps its horizon of {cfg.optim.decay_steps} steps "
            f"(train.max_steps is now {cfg.train.max_steps}): steps after it run at "
            f"optim.min_lr={cfg.optim.min_lr:g}; set optim.decay_steps to choose another"
        )
    before = saved["config"]["precision"]["dtype"]
    if before != cfg.precision.dtype:
        notes.append(
            f"precision.dtype: {before} -> {cfg.precision.dtype}"
            + ("; fp16 starts a fresh loss scaler" if cfg.precision.dtype == "fp16" else "")
        )
    return notes


def two_samples(data: Data, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two training samples on the run's device: a batch for the passes that only
    look at the model (FLOP counting, DDP's bucket layout)."""
    x, y = data.train.get_batch(torch.arange(min(2, len(data.train))))
    return x.to(env.device), y.to(env.device)


def flops_for_mfu(cfg: RunConfig, env: DistEnv, data: Data, model: nn.Module) -> float | None:
    """Training FLOPs per token for the `mfu` metric (the model's own figure, else counted on
    two training samples), or None without counting where no mfu is reported: data without
    tokens, or a device without a known peak. Moves the model to the run's device."""
    tokens = data.spec.tokens_per_sample
    if not tokens or peak_flops(cfg.log, env.device, cfg.precision.dtype) is None:
        return None
    inputs, _ = two_samples(data, env)
    return flops_per_token(model.to(env.device), inputs, len(inputs) * tokens)


def build_trainer(
    cfg: RunConfig,
    env: DistEnv,
    stop: StopRequest | None = None,
    progress: Progress | None = None,
    claim: Callable[[], None] | None = None,
    fault: Fault | None = None,
    launched_at: float | None = None,
) -> Trainer:
    """Data, model (same init on every rank), optimizer, logger; writes the resolved config.
    The caller owns the run directory (see `dist_train.launch.rundir`); `stop` receives its signals
    and `progress` is what its peers read when one of them waits in vain. `claim` (given on
    every rank or none, run on rank 0) makes the owner's moves (`lifecycle.Start.apply`) once
    every check has passed, before anything is written; with it, train.overwrite resumes
    nothing (the earlier run is what it sets aside). `fault`: a test's (launch/faults.py), for
    the checkpointer; `progress` strikes it in the loop. `launched_at`: when the command started
    (Unix time; default now), which goodput's start-up counts from."""
    launched_at = time.time() if launched_at is None else launched_at
    accumulation_steps(cfg, env.world_size)  # fail on a bad batch split before touching anything
    data = build_data(cfg)
    check_watched(cfg, data.val is not None, known_metric_names(cfg, data.spec))
    resume_from = None if claim is not None and cfg.train.overwrite else resolve_resume(cfg)
    saved = read_manifest(resume_from) if resume_from is not None else None
    cfg = with_schedule_horizon(cfg, saved)
    model, flops, about = build_wrapped_model(cfg, env, data, resume_from)
    optimizer = build_optimizer(cfg.optim, model)
    precision = Precision(cfg.precision, env.device)
    checkpointer = Checkpointer(cfg, env, model, optimizer, precision, fault)
    state = TrainState()
    if resume_from is not None:  # before anything is written: a bad checkpoint touches nothing
        checkpointer.load(resume_from, state)
        checkpointer.check_verified()  # its checksums, hashed from the page cache after the load
        if cfg.parallel.grad_compression == "none":  # bitwise resume under DDP on > 2 ranks
            batch = two_samples(data, env)
            settle_buckets(model, batch, build_loss(data.spec), precision.autocast())
    before_writing(cfg, data.spec, env, claim)
    summary = None
    if env.is_main:
        batch = (micro_batch_size(cfg, env.world_size), accumulation_steps(cfg, env.world_size))
        summary = run_facts(cfg, env, data, about, batch, (state.step, resume_from))
        # goodput: where this attempt's start-up began; how often torchrun restarted the group
        summary |= {"launched_at": launched_at, "restart": restart_count()}
    logger = open_logger(cfg, env, state, resume_from, saved, summary)
    return Trainer(
        cfg,
        env,
        data,
        model,
        optimizer,
        precision,
        checkpointer,
        state,
        logger,
        stop or StopRequest(),
        progress or Progress(),
        flops_per_token=flops,
    )


def build_wrapped_model(
    cfg: RunConfig, env: DistEnv, data: Data, resume_from: Path | None
) -> tuple[nn.Module, float | None, dict[str, Any]]:
    """The model, initialised alike on every rank, compiled if asked and wrapped for the
    parallel strategy; with its training FLOPs per token for mfu (None: no mfu) and its facts
    for the run summary. Leaves the RNG seeded per rank for what follows."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec)
    about = model_facts(model, init_weights(model, cfg, resume_from))
    flops = flops_for_mfu(cfg, env, data, model)  # before compile and wrapping: one plain pass
    apply_activation_checkpointing(model, cfg.parallel)  # before compile: it traces the hooks
    if cfg.train.compile:
        # In place (module.compile), so parameter names and checkpoints stay the same; per
        # block where the model has blocks, which is also what FSDP2 shards.
        for unit in fsdp_units(model) or [model]:
            unit.compile()
    model = wrap_model(model, cfg.parallel, cfg.precision, env)
    # Different dropout masks per rank, reproducible per rank.
    torch.manual_seed(cfg.train.seed + env.rank)
    return model, flops, about


def before_writing(
    cfg: RunConfig, spec: DataSpec, env: DistEnv, claim: Callable[[], None] | None
) -> None:
    """Rank 0's last checks (user metrics, trackers' servers) and the owner's moves; every rank
    learns whether they passed (a collective), so none trains on while rank 0 failed."""
    error: DistTrainError | None = None
    if env.is_main:
        try:
            check_before_writing(cfg, spec)
            if claim is not None:
                claim()
        except DistTrainError as e:
            error = e
    if not all_agree(error is None, env):
        raise error or PeerError(f"rank 0 could not start the run in {cfg.train.run_dir}")


def open_logger(
    cfg: RunConfig,
    env: DistEnv,
    state: TrainState,
    resume_from: Path | None,
    saved: dict[str, Any] | None,
    summary: dict[str, Any] | None = None,
) -> MetricsLogger:
    """The metrics logger and trackers (rank 0 writes), then config.yaml and metrics.jsonl
    trimmed to the step the run starts from; says what a resume continues from. A run with
    nothing to train (done already) writes nothing: its record still says what was trained."""
    run_dir, moved, step = Path(cfg.train.run_dir), 0, state.step
    training = env.is_main and step < cfg.train.max_steps and not state.stopped_early
    # Trackers first: one that cannot start ends the run before config.yaml is written.
    trackers = (
        build_trackers(cfg, run_dir, step if resume_from is not None else None) if training else []
    )
    try:
        if training:
            save_config(cfg, run_dir / "config.yaml")
            # One lineage: records past the resumed step belong to the attempt cut short.
            moved = trim_metrics(run_dir, step)
    except BaseException:
        for tracker in trackers:
            tracker.close(finished=False)
        raise
    logger = MetricsLogger(
        run_dir if env.is_main else None,
        cfg.log,
        cfg.train.max_steps,
        trackers=trackers,
        summary=summary,
    )
    if env.is_main and moved:
        logger.print(
            f"metrics.jsonl: moved {moved} record(s) after step {step} (from the "
            "interrupted attempt) to metrics.discarded.jsonl"
        )
    if resume_from is not None and saved is not None:
        logger.print(f"resumed from {resume_from} at step {step}")
        for note in resume_notes(cfg, saved):
            logger.print(f"note: {note}")
    return logger
