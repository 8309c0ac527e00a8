"""What a log step writes: the record of one log interval (loss, lr, throughput, timing,
precision and memory fields, mfu) and the checks every rank runs on it; and the lines that say
a run stops or is done."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.train_state import TrainState
from dist_train.config.schema import RunConfig
from dist_train.data.datasets import DataSpec
from dist_train.launch.env import DistEnv
from dist_train.parallel.precision import Precision
from dist_train.track.goodput import goodput_of
from dist_train.track.metrics import MetricsLogger, mfu, peak_flops, peak_memory
from dist_train.train.nonfinite import check_logged_loss, loss_scale_warning
from dist_train.train.optim import lr_at


class LogRecords:
    """Builds and checks a run's log records. Runs at log steps only, never per step, so what
    is fixed for the run (the mfu inputs) is worked out once here."""

    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        spec: DataSpec,
        precision: Precision,
        flops_per_token: float | None,
    ) -> None:
        self.cfg, self.spec, self.precision = cfg, spec, precision
        self.device, self.world_size = env.device, env.world_size
        peak = peak_flops(cfg.log, env.device, cfg.precision.dtype)
        self.mfu_inputs = (flops_per_token, peak) if flops_per_token and peak else None
        self.warned_scale = False  # the fp16 loss-scale warning is printed once per run

    def build(
        self,
        step: int,
        steps: int,
        loss: float | None,
        norm: torch.Tensor | None,
        wait: float,
        times: tuple[float, float],
    ) -> dict[str, Any]:
        """The record of the `steps` steps up to `step`: `loss` and `wait` (data wait summed
        over the interval) already reduced over ranks; `times`: (the run's start, the interval's
        start) on the host clock."""
        start, last_time = times
        now = time.perf_counter()
        samples_per_sec = steps * self.cfg.train.global_batch_size / (now - last_time)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, self.cfg.optim, self.cfg.optim.decay_steps),
            "grad_norm": None if norm is None else norm.item(),
            "samples_per_sec": samples_per_sec,
            "tokens_per_sec": (
                samples_per_sec * self.spec.tokens_per_sample
                if self.spec.tokens_per_sample
                else None
            ),
            "elapsed_sec": now - start,
            "step_sec": (now - last_time) / steps,
            "data_wait_sec": wait / steps,  # of step_sec, mean over ranks: loading not hidden
            **self.precision.log_fields(),
            **peak_memory(self.device),
        }
        if self.mfu_inputs and record["tokens_per_sec"]:
            record["mfu"] = mfu(record["tokens_per_sec"], *self.mfu_inputs, self.world_size)
        return record

    def check(
        self, record: dict[str, Any], last_step: int, root: Path, logger: MetricsLogger
    ) -> None:
        """Every rank alike (the record holds reduced values): stop on a non-finite loss; warn
        once when the fp16 loss scale falls too low."""
        check_logged_loss(record, last_step, self.cfg.train.on_nonfinite, root)
        warning = loss_scale_warning(record, self.cfg.precision.warn_loss_scale)
        if warning and not self.warned_scale:
            logger.print(warning)
        self.warned_scale = self.warned_scale or warning is not None


def stop_notice(cfg: RunConfig) -> str:
    """The line the first stop signal prints at once (rank 0; `{signal}`: its name)."""
    then = "saving" if cfg.checkpoint.enabled else "exiting (checkpoint.enabled=false)"
    every = cfg.log.every_steps
    return f"{{signal}} received: stopping at the next log step (<= {every} steps) and {then}"


def done_already(cfg: RunConfig, state: TrainState) -> str | None:
    """The line of a run that has nothing left to do (None: it has): stopped early, or at
    max_steps with no evaluation owed (a stop at the last step may leave one)."""
    if state.stopped_early:
        return (
            f"done already: {cfg.train.run_dir} stopped early at step {state.step} "
            "(train.early_stopping); start over with train.overwrite=true"
        )
    if state.step >= cfg.train.max_steps and not state.eval_owed:
        return (
            f"done already: {cfg.train.run_dir} holds a checkpoint at step {state.step} "
            f"(train.max_steps={cfg.train.max_steps}); raise train.max_steps to train further"
        )
    return None


def done_line(
    cfg: RunConfig,
    step: int,
    seconds: float,
    losses: tuple[float | None, float | None],
    is_main: bool,
) -> str:
    """The run's closing line: its last logged loss and val/loss (`losses`, None where none is at
    `step`) and its goodput (productive / wall time), read back from metrics.jsonl as `dist-train
    report` shows it; by rank 0 alone, the one that prints (the others' line goes nowhere)."""
    last, val = losses
    goodput = goodput_of(Path(cfg.train.run_dir)) if is_main else None
    return (
        f"done: {step} steps in {seconds:.1f} s"
        + (f", loss {last:.4f}" if last is not None else "")
        + (f", val/loss {val:.4f}" if val is not None else "")
        + (f", goodput {goodput:.2f}" if goodput is not None else "")
        + f"; metrics in {Path(cfg.train.run_dir) / 'metrics.jsonl'}"
    )
