"""Evaluation metrics, exact across ranks.

Every metric keeps sums (loss sums, counts, a confusion matrix) on the device while batches go
by; one all-reduce adds them over ranks at the end and only then are ratios taken, so the
figures are those of one process seeing every sample: never an average of averages.

A metric is any object with `update(output, target) -> 1-D tensor of sums` (the same length
every call; padding rows are already cut off) and `compute(sums) -> {name: value}`. A user's
metric is plugged in by import path (`train.metrics`), built with no arguments.

A stop signal cuts an evaluation short at a micro-batch boundary that every rank agrees on: one
process checks before each micro-batch; several agree through a one-float all-reduce every
`STOP_CHECK_BATCHES` micro-batches (the evaluation has no collective of its own until its end).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dist_train.config.schema import RunConfig
from dist_train.config.targets import call_target, resolve_target
from dist_train.data.datasets import DataSpec
from dist_train.data.loader import BatchLoader
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.protocol import logits_of
from dist_train.parallel.precision import Precision

# Micro-batches between two stop checks of a multi-process evaluation: the most a stop waits for,
# and the cadence of its all-reduce (one float and a host sync: measured in the README).
STOP_CHECK_BATCHES = 16


class EvaluationStopped(Exception):
    """A stop signal cut the evaluation short; raised on every rank at the same micro-batch."""

    def __init__(self, batches: int) -> None:
        super().__init__(batches)
        self.batches = batches  # micro-batches this rank had evaluated


class Metric(Protocol):
    def update(self, output: Any, target: torch.Tensor) -> torch.Tensor: ...
    def compute(self, sums: torch.Tensor) -> dict[str, float]: ...


class LossMetric:
    """The task's loss (mean over samples, or tokens for language models); `perplexity` for
    language models."""

    def __init__(self, task: str) -> None:
        self.task = task

    def update(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output).float()
        if self.task == "lm":
            total = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="sum")
        elif self.task == "regression":
            total = F.mse_loss(logits, target.float(), reduction="sum")
        else:
            total = F.cross_entropy(logits, target, reduction="sum")
        count = target.numel() if self.task != "classification" else len(target)
        return torch.stack([total, torch.tensor(float(count), device=total.device)])

    def compute(self, sums: torch.Tensor) -> dict[str, float]:
        total, count = sums.tolist()
        loss = total / count if count else math.nan
        if self.task != "lm":
            return {"loss": loss}
        return {"loss": loss, "perplexity": math.exp(min(loss, 700.0))}


class ClassificationMetrics:
    """Accuracy, and macro precision, recall and F1 over the classes that occur (as targets or
    predictions), from the confusion matrix summed over ranks; a class never predicted has
    precision 0 (scikit-learn's zero_division=0)."""

    def update(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        logits = logits_of(output)
        classes = logits.shape[-1]
        pairs = target.flatten() * classes + logits.argmax(-1).flatten()
        return torch.bincount(pairs, minlength=classes * classes).float()

    def compute(self, sums: torch.Tensor) -> dict[str, float]:
        classes = math.isqrt(len(sums))
        confusion = sums.view(classes, classes).double()  # rows: target, columns: prediction
        true_pos = confusion.diagonal()
        actual, predicted = confusion.sum(1), confusion.sum(0)
        present = (actual + predicted) > 0
        precision = torch.where(predicted > 0, true_pos / predicted.clamp(min=1), 0.0)
        recall = torch.where(actual > 0, true_pos / actual.clamp(min=1), 0.0)
        denom = precision + recall
        f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
        total = confusion.sum().item()
        return {
            "accuracy": true_pos.sum().item() / total if total else math.nan,
            "precision": precision[present].mean().item(),
            "recall": recall[present].mean().item(),
            "f1": f1[present].mean().item(),
        }


def known_metric_names(cfg: RunConfig, spec: DataSpec) -> list[str] | None:
    """The `val/...` names an evaluation of this run reports, known before it runs; None when
    a user metric does not declare its names (a `names` attribute)."""
    names = ["loss", "perplexity"] if spec.task == "lm" else ["loss"]
    if spec.task == "classification":
        names += ["accuracy", "precision", "recall", "f1"]
    for target in cfg.train.metrics:
        declared = getattr(resolve_target(target, "train.metrics"), "names", None)
        if declared is None:
            return None
        if isinstance(declared, str) or not all(isinstance(n, str) for n in declared):
            raise ConfigError(
                "train.metrics", target, f"its names must be a list of strings, not {declared!r}"
            )
        names += list(declared)
    return [f"val/{n}" for n in names]


def build_metrics(cfg: RunConfig, spec: DataSpec) -> list[Metric]:
    """The task's metrics and the user's (`train.metrics`), each checked to be a metric: called
    before the run writes anything, so a bad one leaves the run directory as it was."""
    metrics: list[Metric] = [LossMetric(spec.task)]
    if spec.task == "classification":
        metrics.append(ClassificationMetrics())
    for target in cfg.train.metrics:
        metric = call_target(target, "train.metrics", "train.metrics")
        check_metric(metric, target)
        metrics.append(metric)
    return metrics


METRIC_SHAPE = "update(output, target) -> 1-D tensor of sums and compute(sums) -> {name: value}"


def check_metric(metric: Any, target: str) -> None:
    """A user's metric has the methods evaluation calls, taking the arguments it passes: found
    now, not at the first evaluation after steps of training."""
    name = type(metric).__name__
    missing = [m for m in ("update", "compute") if not callable(getattr(metric, m, None))]
    if missing:
        reason = f"{name} has no {' or '.join(missing)} method; a metric has {METRIC_SHAPE}"
        raise ConfigError("train.metrics", target, reason)
    for method, args in (("update", 2), ("compute", 1)):
        try:
            inspect.signature(getattr(metric, method)).bind(*[None] * args)
        except TypeError as e:
            reason = f"{name}.{method} does not take {args} argument(s) ({e}); a metric has {METRIC_SHAPE}"
            raise ConfigError("train.metrics", target, reason) from None
        except ValueError:  # no signature to inspect (a builtin): the call decides
            pass


class MetricSums:
    """One evaluation's running sums, one slot per metric, on the device."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics
        self.sums: list[torch.Tensor | None] = [None] * len(metrics)

    def add(self, output: Any, target: torch.Tensor, real: int) -> None:
        """A micro-batch's output; its first `real` rows are samples, the rest padding."""
        if real < len(target):
            output, target = _rows(output, real), target[:real]
        for k, metric in enumerate(self.metrics):
            part = metric.update(output, target).detach().double()
            current = self.sums[k]
            self.sums[k] = part if current is None else current + part

    def reduce(self, env: DistEnv) -> dict[str, float]:
        """Sums over ranks (one all-reduce), then each metric's values, prefixed `val/`."""
        empty = torch.zeros(0, dtype=torch.float64, device=env.device)
        parts = [s if s is not None else empty for s in self.sums]
        flat = torch.cat([p.flatten() for p in parts])
        if env.is_distributed:
            dist.all_reduce(flat)
        values: dict[str, float] = {}
        pieces = flat.cpu().split([p.numel() for p in parts])
        for metric, piece in zip(self.metrics, pieces, strict=True):
            values.update({f"val/{k}": float(v) for k, v in metric.compute(piece).items()})
        return values


def _rows(output: Any, n: int) -> Any:
    """The first n rows of a model output (a tensor, or an object/dict holding `logits`)."""
    logits = logits_of(output)
    return logits[:n]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: BatchLoader,
    metrics: list[Metric],
    cfg: RunConfig,
    precision: Precision,
    env: DistEnv,
    stop: Callable[[], bool] | None = None,
) -> dict[str, float] | None:
    """The metrics over every validation sample once, or over `eval_batches` seeded global
    batches (`train.eval_mode`), split across ranks like training batches, reduced as sums.
    `stop`: whether this rank was asked to stop; raises `EvaluationStopped` once any was."""
    t = cfg.train
    small = len(batches.dataset) <= t.eval_batches * t.global_batch_size
    if t.eval_mode == "full" or (t.eval_mode == "auto" and small):
        stream = batches.every_sample_once()
    elif t.eval_batches > 0:
        stream = batches.iterate(0, t.eval_batches)
    else:
        return None
    model.eval()
    sums = MetricSums(metrics)
    try:
        for k, (_, _, x, y, real) in enumerate(stream):
            if stop is not None and stop_agreed(k, stop, env):
                raise EvaluationStopped(k)
            with precision.autocast():
                output = model(x)
            sums.add(output, y, real)
    finally:
        model.train()
    return sums.reduce(env)


def stop_agreed(batch: int, stop: Callable[[], bool], env: DistEnv) -> bool:
    """Before micro-batch `batch`: whether any rank was asked to stop. Every rank runs the same
    number of micro-batches (see `EverySampleOnce`), so all reach each check together."""
    if not env.is_distributed:
        return stop()
    if batch % STOP_CHECK_BATCHES:
        return False
    flag = torch.tensor([1.0 if stop() else 0.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag.item() > 0
