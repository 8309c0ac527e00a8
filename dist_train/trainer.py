"""The training loop: a few short methods over objects built from config."""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dist_train.checkpoint.checkpointer import Checkpointer, TrainState
from dist_train.checkpoint.export import init_model
from dist_train.checkpoint.files import complete_checkpoints, read_manifest, resolve_resume
from dist_train.config import RunConfig, accumulation_steps, micro_batch_size, save_config
from dist_train.data import Data, DataSpec, GlobalBatchSampler, build_data
from dist_train.env import DistEnv, all_agree, all_reduce_mean
from dist_train.errors import NonFiniteError
from dist_train.metrics import MetricsLogger, mfu, peak_flops, trim_metrics
from dist_train.models import build_model
from dist_train.models.gpt import GPT, generate
from dist_train.optim import build_optimizer, clip_and_measure, decay_horizon, lr_at, set_lr
from dist_train.parallel import grad_sync, unwrap, wrap_model
from dist_train.precision import Precision
from dist_train.signals import Preempted, StopRequest
from dist_train.watch import Progress, StopVote

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def build_loss(spec: DataSpec) -> LossFn:
    if spec.task == "lm":
        return lambda logits, y: F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if spec.task == "regression":
        return F.mse_loss
    return F.cross_entropy


@dataclass
class FitResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean train loss of interval
    val_losses: dict[int, float] = field(default_factory=dict)
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
        stop: StopVote,
        progress: Progress,
    ) -> None:
        self.cfg, self.env, self.data, self.model = cfg, env, data, model
        self.optimizer, self.precision, self.checkpointer = optimizer, precision, checkpointer
        self.state, self.logger, self.stop, self.progress = state, logger, stop, progress
        self.loss_fn = build_loss(data.spec)
        self.accum = accumulation_steps(cfg, env.world_size)
        self.micro_batch_size = micro_batch_size(cfg, env.world_size)
        self.sampler = GlobalBatchSampler(
            len(data.train), cfg.train.global_batch_size, cfg.train.seed
        )
        flops = getattr(unwrap(model), "flops_per_token", None)
        peak = peak_flops(cfg.log, env.device, cfg.precision.dtype)
        self._mfu_inputs = (flops(), peak) if flops is not None and peak else None
        # Loss summed on the device between log steps: no host sync on steps that do not log.
        self._interval_loss = torch.zeros((), device=env.device)
        # on_nonfinite=skip: updates dropped (in total, in a row, in this log interval).
        self.skip_nonfinite = cfg.train.on_nonfinite == "skip"
        self.nonfinite_skips, self._skips_in_a_row, self._interval_skips = 0, 0, 0
        self._warned_scale = False

    def _to_device(
        self, indices: torch.Tensor, dataset: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = dataset.get_batch(indices)  # type: ignore[attr-defined]
        if self.env.device.type == "cuda":
            return (
                x.pin_memory().to(self.env.device, non_blocking=True),
                y.pin_memory().to(self.env.device, non_blocking=True),
            )
        return x, y

    def train_step(self, step: int, measure_norm: bool) -> torch.Tensor | None:
        """One optimizer step over this rank's slice of the global batch, in micro-batches."""
        set_lr(self.optimizer, lr_at(step, self.cfg.optim, self.cfg.optim.decay_steps))
        before = self._interval_loss.clone() if self.skip_nonfinite else None
        indices = self.sampler.rank_indices(step, self.env.rank, self.env.world_size)
        chunks = indices.split(self.micro_batch_size)
        for i, chunk in enumerate(chunks):
            self.progress.enter("data", step, i)
            x, y = self._to_device(chunk, self.data.train)
            self.progress.enter("forward/backward", step, i)
            with grad_sync(self.model, enabled=i == len(chunks) - 1):
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
                + self._last_good()
            )
        return True

    def _last_good(self) -> str:
        found = complete_checkpoints(self.checkpointer.root)
        where = f"the newest checkpoint, {found[-1]}, is finite" if found else "nothing was saved"
        return f"{where}; lower optim.lr, check the data, or clip gradients (optim.grad_clip)"

    def _check_finite_before_save(self) -> None:
        """Collective, on saving steps only: no checkpoint with a non-finite loss since the last
        log step, or non-finite weights (any rank's shard), is ever written."""
        model = unwrap(self.model)
        local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
        flags = [torch.isfinite(self._interval_loss), *(torch.isfinite(t).all() for t in local)]
        if not all_agree(bool(torch.stack(flags).all().item()), self.env):
            raise NonFiniteError(
                f"train.on_nonfinite: the loss or the weights are not finite at step "
                f"{self.state.step}; stopped without saving them; " + self._last_good()
            )

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean validation loss over the same fixed global batches every time, split across
        ranks exactly like training batches and averaged over all of them."""
        if self.data.val is None or self.cfg.train.eval_batches <= 0:
            return None
        sampler = GlobalBatchSampler(
            len(self.data.val), self.cfg.train.global_batch_size, self.cfg.train.seed
        )
        model = unwrap(self.model)
        model.eval()
        self.progress.enter("evaluation", self.state.step)
        totals = torch.zeros(2, device=self.env.device)  # loss * samples, samples
        for b in range(self.cfg.train.eval_batches):
            indices = sampler.rank_indices(b, self.env.rank, self.env.world_size)
            for chunk in indices.split(self.micro_batch_size):
                x, y = self._to_device(chunk, self.data.val)
                with self.precision.autocast():
                    totals[0] += self.loss_fn(model(x), y).float() * len(chunk)
                totals[1] += len(chunk)
        model.train()
        all_reduce_mean(totals, self.env)  # the ratio is what matters; mean == sum / world
        return (totals[0] / totals[1]).item()

    def maybe_log(
        self,
        norm: torch.Tensor | None,
        interval: tuple[int, float],
        result: FitResult,
        start: float,
        force: bool = False,
    ) -> bool:
        """At log steps: reduce the interval's loss over ranks (every rank joins) and write."""
        step, (last_step, last_time) = self.state.step, interval
        if step % self.cfg.log.every_steps and step != self.cfg.train.max_steps and not force:
            return False
        self.progress.enter("log", step - 1)
        applied = step - last_step - self._interval_skips  # on_nonfinite=skip drops some
        total = all_reduce_mean(self._interval_loss, self.env).item()
        loss = total / applied if applied else None  # None: every update was skipped
        self._interval_loss.zero_()
        self._interval_skips = 0
        now = time.perf_counter()
        samples_per_sec = (step - last_step) * self.cfg.train.global_batch_size / (now - last_time)
        record = {
            "step": step,
            "loss": loss,
            "lr": lr_at(step - 1, self.cfg.optim, self.cfg.optim.decay_steps),
            "grad_norm": None if norm is None else norm.item(),
            "samples_per_sec": samples_per_sec,
            "tokens_per_sec": (
                samples_per_sec * self.data.spec.tokens_per_sample
                if self.data.spec.tokens_per_sample
                else None
            ),
            "elapsed_sec": now - start,
            **self.precision.log_fields(),
        }
        if self._mfu_inputs and record["tokens_per_sec"]:
            record["mfu"] = mfu(record["tokens_per_sec"], *self._mfu_inputs, self.env.world_size)
        if self.skip_nonfinite:
            record["nonfinite_skips"] = self.nonfinite_skips
        if loss is not None:
            result.losses[step] = loss
        self.logger.log(record)
        self._check_logged(record, last_step)
        return True

    def _check_logged(self, record: dict[str, Any], last_step: int) -> None:
        """The logged loss is reduced over ranks, so every rank takes the same decision."""
        step, loss = record["step"], record["loss"]
        if loss is not None and not math.isfinite(loss):
            raise NonFiniteError(
                f"train.on_nonfinite={self.cfg.train.on_nonfinite}: the training loss is {loss} "
                f"in steps {last_step + 1}..{step}; stopped without saving it; " + self._last_good()
            )
        scale = record.get("loss_scale")
        if scale is not None and scale < self.cfg.precision.warn_loss_scale:
            if not self._warned_scale:
                self.logger.print(
                    f"warning: the fp16 loss scale fell to {scale:.3g} at step {step} (below "
                    f"precision.warn_loss_scale={self.cfg.precision.warn_loss_scale:g}): "
                    f"gradients overflow even unscaled and {record.get('skipped_steps')} steps "
                    "were skipped; lower optim.lr or use precision.dtype=bf16"
                )
            self._warned_scale = True

    def maybe_evaluate(self, result: FitResult) -> None:
        every, step = self.cfg.train.eval_every, self.state.step
        if step == self.cfg.train.max_steps or (every > 0 and step % every == 0):
            val = self.evaluate()
            if val is not None:
                result.val_losses[step] = val
                self.logger.log({"step": step, "val_loss": val})

    def maybe_checkpoint(self) -> None:
        """Periodic saves (async if configured) and the final one, always synchronous."""
        ckpt, step = self.cfg.checkpoint, self.state.step
        self.checkpointer.poll()
        if not ckpt.enabled:
            return
        final = step == self.cfg.train.max_steps
        if final or (ckpt.every_steps and step % ckpt.every_steps == 0):
            self._save(blocking=final)

    def _save(self, blocking: bool) -> None:
        self.progress.enter("checkpoint", self.state.step - 1)
        self._check_finite_before_save()
        self.checkpointer.save(self.state, blocking=blocking)

    def _preempted(self, signum: int, norm: torch.Tensor | None, *log: Any) -> Preempted:
        """Every rank, at the same step: log the partial interval, save (unless this step's
        save is already under way: then finish it) and report."""
        if self.state.step % self.cfg.log.every_steps:
            self.maybe_log(norm, *log, force=True)
        saved = None
        if self.cfg.checkpoint.enabled:
            if self.checkpointer.saved_step == self.state.step:
                self.checkpointer.wait()
            else:
                self._save(blocking=True)
            saved = str(self.checkpointer.root / f"step_{self.state.step:07d}")
        return Preempted(signum, self.state.step, saved)

    def fit(self) -> FitResult:
        result = FitResult()
        if self.state.step >= self.cfg.train.max_steps:
            self.logger.print(
                f"done already: {self.cfg.train.run_dir} holds a checkpoint at step "
                f"{self.state.step} (train.max_steps={self.cfg.train.max_steps}); "
                "raise train.max_steps to train further"
            )
            return result
        self.model.train()
        start = time.perf_counter()
        interval = (self.state.step, start)
        while self.state.step < self.cfg.train.max_steps:
            step = self.state.step
            logging_now = (step + 1) % self.cfg.log.every_steps == 0
            norm = self.train_step(step, measure_norm=logging_now)
            self.state.step += 1
            self.state.samples_seen += self.cfg.train.global_batch_size
            stop = self.stop()  # every rank learns the same answer at the same step
            if self.maybe_log(norm, interval, result, start):
                interval = (self.state.step, time.perf_counter())
            self.logger.bar(self.state.step, result.losses.get(max(result.losses, default=-1)))
            self.maybe_checkpoint()  # before evaluation: work is safe as early as possible
            if stop and self.state.step < self.cfg.train.max_steps:
                raise self._preempted(stop, norm, interval, result, start)
            self.maybe_evaluate(result)
        result.sample = self.maybe_sample()
        last = result.losses.get(self.state.step)
        val = result.val_losses.get(self.state.step)
        self.logger.print(
            f"done: {self.state.step} steps in {time.perf_counter() - start:.1f} s"
            + (f", loss {last:.4f}" if last is not None else "")
            + (f", val_loss {val:.4f}" if val is not None else "")
            + f"; metrics in {Path(self.cfg.train.run_dir) / 'metrics.jsonl'}"
        )
        return result

    def close(self) -> None:
        """Release the DDP wrapper before the process group goes: destroying a gloo group while
        a DDP reducer still holds it aborts the process now and then (torch 2.13)."""
        self.logger.close()
        self.stop.close()
        self.checkpointer.close()
        self.model = unwrap(self.model)
        gc.collect()  # DDP's hooks form reference cycles; free it now, not at exit

    def maybe_sample(self) -> str | None:
        """Every rank samples the same text (same seed): under FSDP2 each forward gathers
        parameters collectively, so all ranks must take part. Only the main rank prints."""
        spec, chars = self.data.spec, self.cfg.train.sample_chars
        model = unwrap(self.model)
        if not (chars > 0 and spec.encode and spec.decode and isinstance(model, GPT)):
            return None
        prompt_ids = spec.encode(self.cfg.train.sample_prompt) or [0]
        prompt = torch.tensor([prompt_ids], device=self.env.device)
        g = torch.Generator(device=self.env.device).manual_seed(self.cfg.train.seed)
        with self.precision.autocast():
            out = generate(model, prompt, chars, generator=g)
        text = spec.decode(out[0].tolist())
        self.logger.print(f"--- sample ({chars} characters) ---\n{text}\n---")
        return text


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


def build_trainer(
    cfg: RunConfig,
    env: DistEnv,
    stop: StopRequest | None = None,
    progress: Progress | None = None,
) -> Trainer:
    """Data, model (same init on every rank), optimizer, logger; writes the resolved config.
    The caller owns the run directory (see `dist_train.rundir`); `stop` receives its signals
    and `progress` is what its peers read when one of them waits in vain."""
    accumulation_steps(cfg, env.world_size)  # fail on a bad batch split before touching anything
    data = build_data(cfg)
    resume_from = resolve_resume(cfg)
    saved = read_manifest(resume_from) if resume_from is not None else None
    cfg = with_schedule_horizon(cfg, saved)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, data.spec)
    init_model(model, None if resume_from else cfg.model.init_from, list(cfg.model.freeze))
    if cfg.train.compile:
        # In place (module.compile), so parameter names and checkpoints stay the same; per
        # block where the model has blocks, which is also what FSDP2 shards.
        for unit in getattr(model, "fsdp_units", lambda: [model])():
            unit.compile()
    model = wrap_model(model, cfg.parallel, cfg.precision, env)
    # Different dropout masks per rank, reproducible per rank.
    torch.manual_seed(cfg.train.seed + env.rank)
    optimizer = build_optimizer(cfg.optim, model)
    precision = Precision(cfg.precision, env.device)
    checkpointer = Checkpointer(cfg, env, model, optimizer, precision)
    vote = StopVote(stop or StopRequest(), env)
    state = TrainState()
    if resume_from is not None:  # before anything is written: a bad checkpoint touches nothing
        checkpointer.load(resume_from, state)
        checkpointer.check_verified()  # its checksums, hashed from the page cache after the load
    run_dir, moved = Path(cfg.train.run_dir), 0
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        # One lineage: records past the resumed step belong to the attempt that was cut short.
        moved = trim_metrics(run_dir, state.step)
    logger = MetricsLogger(run_dir if env.is_main else None, cfg.log, cfg.train.max_steps)
    if env.is_main and moved:
        logger.print(
            f"metrics.jsonl: moved {moved} record(s) after step {state.step} (from the "
            "interrupted attempt) to metrics.discarded.jsonl"
        )
    if resume_from is not None and saved is not None:
        logger.print(f"resumed from {resume_from} at step {state.step}")
        for note in resume_notes(cfg, saved):
            logger.print(f"note: {note}")
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
        vote,
        progress or Progress(),
    )
