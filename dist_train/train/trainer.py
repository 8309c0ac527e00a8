"""The training loop: a few short methods over objects built from config."""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.train_state import TrainState
from dist_train.config.schema import RunConfig, accumulation_steps, micro_batch_size
from dist_train.data.datasets import Data
from dist_train.data.loader import BatchLoader
from dist_train.errors import NonFiniteError
from dist_train.launch.env import DistEnv, all_reduce_mean
from dist_train.launch.signals import Preempted, StopRequest
from dist_train.launch.watch import Progress
from dist_train.parallel.precision import Precision
from dist_train.parallel.wrap import grad_sync, unwrap
from dist_train.track.metrics import MetricsLogger
from dist_train.train.evaluation import EvaluationStopped, build_metrics, evaluate
from dist_train.train.loss import build_loss
from dist_train.train.nonfinite import check_finite_before_save, last_good
from dist_train.train.optim import clip_and_measure, lr_at, set_lr
from dist_train.train.records import LogRecords, done_already, done_line, stop_notice
from dist_train.train.sampling import end_of_run_sample
from dist_train.train.selection import Watches
from dist_train.train.timing import RunClock


@dataclass
class FitResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean train loss of interval
    val_losses: dict[int, float] = field(default_factory=dict)
    val_metrics: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> val/...
    sample: str | None = None


class Trainer:
    def __init__(
        self,
        cfg: RunConfig,
        env: DistEnv,
        data: Data,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        precision: Precision,
        checkpointer: Checkpointer,
        state: TrainState,
        logger: MetricsLogger,
        stop: StopRequest,
        progress: Progress,
        flops_per_token: float | None = None,
    ) -> None:
        """`flops_per_token`: training FLOPs per token for the `mfu` metric (see
        `build.flops_for_mfu`; counted before wrapping), None for no mfu."""
        self.cfg, self.env, self.data, self.model = cfg, env, data, model
        self.optimizer, self.precision, self.checkpointer = optimizer, precision, checkpointer
        self.state, self.logger, self.stop, self.progress = state, logger, stop, progress
        self.loss_fn = build_loss(data.spec)
        self.metrics = build_metrics(cfg, data.spec)
        self.watches = Watches(cfg, state.watches)
        self.accum = accumulation_steps(cfg, env.world_size)
        self.micro_batch_size = micro_batch_size(cfg, env.world_size)
        batch, seed = cfg.train.global_batch_size, cfg.train.seed
        self.train_batches = BatchLoader(
            data.train, batch, seed, env, self.micro_batch_size, cfg.data
        )
        self.val_batches = (
            BatchLoader(data.val, batch, seed, env, self.micro_batch_size, cfg.data, "val")
            if data.val is not None
            else None
        )
        self.records = LogRecords(cfg, env, data.spec, precision, flops_per_token)
        # Loss summed on the device between log steps: no host sync on steps that do not log.
        self._interval_loss = torch.zeros((), device=env.device)
        self._interval_wait = 0.0  # seconds the step waited for its batches (host clock)
        # on_nonfinite=skip: updates dropped (in total, in a row, in this log interval).
        self.skip_nonfinite = cfg.train.on_nonfinite == "skip"
        self.nonfinite_skips, self._skips_in_a_row, self._interval_skips = 0, 0, 0
        self.stopping = False  # some rank was asked to stop: known alike on all at log steps
        # The loop's clock (goodput's too) and the current log interval's (first step, start).
        self.clock = RunClock()
        self._interval = (state.step, self.clock.start)
        stop.tell(stop_notice(cfg) if env.is_main else None)

    def train_step(self, step: int, measure_norm: bool) -> torch.Tensor | None:
        """One optimizer step over this rank's slice of the global batch, in micro-batches."""
        set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.optim.decay_steps))
        before = self._interval_loss.clone() if self.skip_nonfinite else None
        for i in range(self.accum):
            self.progress.enter("data", step, i)
            waiting_since = time.perf_counter()
            x, y = self.train_batches.get(step, i)
            self._interval_wait += time.perf_counter() - waiting_since
            self.progress.enter("forward/backward", step, i)
            with grad_sync(self.model, i == self.accum - 1, self.cfg.parallel):
                with self.precision.autocast():
                    loss = self.loss_fn(self.model(x), y)
                    if self.accum > 1:  # mean over the rank's whole slice, not one micro-batch
                        loss = loss / self.accum
                self.precision.backward(loss)
            self._interval_loss += loss.detach()
        self.progress.enter("optimizer", step)
        self.precision.unscale_(self.optimizer)
        norm = clip_and_measure(
            self.model,
            self.cfg.optim.grad_clip,
            measure_norm or self.precision.needs_grad_norm or self.skip_nonfinite,
        )
        if before is not None and self._skipped(norm, before, step):  # type: ignore[arg-type]
            if self.precision.scaler:  # it skips the update itself, and lowers the scale
                self.precision.step(self.optimizer, norm)
        else:
            self.precision.step(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _skipped(self, norm: torch.Tensor, before: torch.Tensor, step: int) -> bool:
        """on_nonfinite=skip: drop an update whose gradients are not finite. The global norm is
        the same on every rank (DDP/FSDP reduce it), so all ranks decide alike, at the price of
        one host sync per step that only this mode pays."""
        if torch.isfinite(norm).item():
            self._skips_in_a_row = 0
            return False
        self._interval_loss.copy_(before)  # the interval's loss is the mean of applied steps
        self.nonfinite_skips += 1
        self._interval_skips += 1
        self._skips_in_a_row += 1
        if self._skips_in_a_row > self.cfg.train.max_nonfinite_skips:
            raise NonFiniteError(
                f"train.on_nonfinite=skip: {self._skips_in_a_row} updates in a row had "
                f"non-finite gradients, the last at step {step + 1} "
                f"(train.max_nonfinite_skips={self.cfg.train.max_nonfinite_skips}); "
                + last_good(self.checkpointer.root)
            )
        return True

    def evaluate(self) -> dict[str, float] | None:
        """Validation metrics (`val/loss`, ...): see evaluation.py."""
        if self.val_batches is None:
            return None
        self.progress.enter("evaluation", self.state.step - 1)
        return evaluate(
            unwrap(self.model),
            self.val_batches,
            self.metrics,
            self.cfg,
            self.precision,
            self.env,
            stop=lambda: self.stopping or self.stop.signum != 0,
        )

    def maybe_log(self, norm: torch.Tensor | None, result: FitResult, force: bool = False) -> None:
        """At log steps (or `force`d: a stop between them): reduce the interval's loss over ranks
        (every rank joins) and write. The same all-reduce carries whether any rank was asked to
        stop (SIGTERM/SIGUSR1), so all ranks stop at the same step at no cost to the steps in
        between."""
        step, (last_step, last_time) = self.state.step, self._interval
        if not force and step % self.cfg.log.every_steps and step != self.cfg.train.max_steps:
            return
        self.progress.enter("log", step - 1)
        applied = step - last_step - self._interval_skips  # on_nonfinite=skip drops some
        flags = [1.0 if self.stop.signum else 0.0, self._interval_wait]
        side = torch.tensor(flags, device=self.env.device)
        total, anyone, wait = all_reduce_mean(
            torch.cat([self._interval_loss.view(1), side]), self.env
        ).tolist()
        self.stopping = anyone > 0
        loss = total / applied if applied else None  # None: every update was skipped
        self._interval_loss.zero_()
        self._interval_skips, self._interval_wait = 0, 0.0
        times = (self.clock.start, last_time)
        record = self.records.build(step, step - last_step, loss, norm, wait, times)
        record.update(self.clock.since_record(record["elapsed_sec"]))
        if self.skip_nonfinite:
            record["nonfinite_skips"] = self.nonfinite_skips
        if loss is not None:
            result.losses[step] = loss
        self.logger.log(record)
        self.records.check(record, last_step, self.checkpointer.root, self.logger)
        self._interval = (step, time.perf_counter())

    def eval_due(self) -> bool:
        every, step = self.cfg.train.eval_every, self.state.step
        scheduled = step == self.cfg.train.max_steps or (every > 0 and step % every == 0)
        return scheduled and self.val_batches is not None

    def maybe_evaluate(self, result: FitResult) -> dict[str, float] | None:
        if not self.eval_due():
            return None
        step = self.state.step
        with self.clock.evaluating() as took:  # goodput: its seconds, or lost when cut short
            values = self.evaluate()
        if values is not None:
            result.val_losses[step] = values["val/loss"]
            result.val_metrics[step] = values
            self.logger.log({"step": step, **values, **took})
        return values

    def maybe_checkpoint(self, now: bool = False) -> None:
        """Periodic saves (async if configured), `now` (a new best), and the last one (the end
        of the run or an early stop), always synchronous."""
        ckpt, step = self.cfg.checkpoint, self.state.step
        final = step == self.cfg.train.max_steps or self.state.stopped_early
        periodic = bool(ckpt.every_steps and step % ckpt.every_steps == 0)
        due = ckpt.enabled and (final or now or periodic)
        if not due and not self.checkpointer.saving:
            return  # nothing to save or commit: no clock read on ordinary steps
        with self.clock.counting("checkpoint_sec"):  # goodput: the loop waits for it here
            self.checkpointer.poll()
            if due:
                self._save(blocking=final)

    def _save(self, blocking: bool) -> None:
        self.progress.enter("checkpoint", self.state.step - 1)
        check_finite_before_save(
            unwrap(self.model),
            self._interval_loss,
            self.env,
            self.state.step,
            self.checkpointer.root,
        )
        self.checkpointer.save(self.state, blocking=blocking)

    def _preempted(self, owed: bool) -> Preempted:
        """Every rank, at the same step: save, unless this step's save is already under way
        (then finish it), and report. `owed`: this step's evaluation has not run; the checkpoint
        says so and the resumed run runs it first."""
        saved = None
        self.state.eval_owed = owed
        if self.cfg.checkpoint.enabled:
            with self.clock.counting("checkpoint_sec"):
                if self.checkpointer.saved_step == self.state.step:
                    self.checkpointer.wait()
                else:
                    self._save(blocking=True)
            saved = str(self.checkpointer.root / f"step_{self.state.step:07d}")
        self.logger.end(self.state.step, "stopped", self.clock.since_record())
        return Preempted(self.stop.signum, self.state.step, saved)

    def _evaluate_then_save(self, result: FitResult, owed: bool = False) -> None:
        """Evaluate before saving: the checkpoint then holds what this evaluation decided (best
        so far, early stopping), and a resume decides as an uninterrupted run. A stop signal
        cuts the evaluation short: the stop's checkpoint owes it. `owed`: the one a stop left
        owing; saved again after it, so that the checkpoint at this step owes nothing."""
        try:
            values = self.maybe_evaluate(result)
        except EvaluationStopped as e:
            step = self.state.step
            self.logger.print(
                f"evaluation at step {step} stopped after {e.batches} micro-batch(es); the "
                "resumed run runs it first"
            )
            if step > self._interval[0]:  # a step between log steps: its interval's record
                self.maybe_log(None, result, force=True)
            self.stopping = True
            raise self._preempted(owed=True) from None
        new_best = values is not None and self.watches.update(values, self.state)
        self.maybe_checkpoint(now=new_best or owed)
        if self.state.stopped_early:
            self.logger.print(self.watches.early_stop_line(self.state.step))

    def fit(self) -> FitResult:
        result = FitResult()
        if (line := done_already(self.cfg, self.state)) is not None:
            self.logger.print(line)
            return result
        self.clock.reset()  # the loop starts: elapsed_sec and goodput's sums count from here
        self._interval = (self.state.step, self.clock.start)
        self.logger.start(self.state.step, self.clock.timing())  # the run summary, on rank 0
        self.model.train()
        if self.state.eval_owed:  # the stop that ended the last attempt came before it
            self.state.eval_owed = False
            self.logger.print(f"evaluating step {self.state.step} first (owed by the stop)")
            self._evaluate_then_save(result, owed=True)
        while self.state.step < self.cfg.train.max_steps and not self.state.stopped_early:
            step = self.state.step
            logging_now = (step + 1) % self.cfg.log.every_steps == 0
            norm = self.train_step(step, measure_norm=logging_now)
            self.state.step += 1
            self.state.samples_seen += self.cfg.train.global_batch_size
            self.maybe_log(norm, result)
            self.logger.bar(self.state.step)  # the bar shows the last logged loss
            if self.stopping and self.state.step < self.cfg.train.max_steps:
                raise self._preempted(owed=self.eval_due())
            self._evaluate_then_save(result)
        with self.clock.counting("sample_sec"):
            result.sample = end_of_run_sample(
                self.cfg, unwrap(self.model), self.data.spec, self.env, self.precision, self.logger
            )
        seconds, step = time.perf_counter() - self.clock.start, self.state.step
        how = "stopped early" if self.state.stopped_early else "done"
        self.logger.end(step, how, self.clock.since_record())
        last = (result.losses.get(step), result.val_losses.get(step))
        self.logger.print(done_line(self.cfg, step, seconds, last, self.env.is_main))
        return result

    def close(self) -> None:
        """Release the DDP wrapper before the process group goes: destroying a gloo group while
        a DDP reducer still holds it aborts the process now and then (torch 2.13)."""
        self.logger.close(finished=True if self.state.stopped_early else None)
        self.checkpointer.close()
        for batches in (self.train_batches, self.val_batches):
            if batches is not None:
                batches.close()
        self.model = unwrap(self.model)
        gc.collect()  # DDP's hooks form reference cycles; free it now, not at exit
