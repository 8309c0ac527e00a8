"""Watching an evaluation metric: the best checkpoint (`checkpoint.best`) and early stopping
(`train.early_stopping`).

The values come out of one all-reduce (evaluation.py), so every rank sees the same numbers and
decides alike without another collective. What a watch knows (best value, its step, evaluations
since) lives in the checkpointed TrainState, so a resumed run decides as the uninterrupted one.
"""

from __future__ import annotations

from typing import Any

from dist_train.checkpoint.train_state import BEST, EARLY
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError


class MetricWatch:
    def __init__(
        self, key: str, metric: str, mode: str, min_delta: float, state: dict[str, Any]
    ) -> None:
        self.key, self.metric, self.mode, self.min_delta = key, metric, mode, min_delta
        self.state = state  # TrainState.watches[...]: updated in place, saved with it

    def update(self, values: dict[str, float], step: int) -> bool:
        """True when this evaluation is the best so far (by more than min_delta)."""
        if self.metric not in values:
            error = ConfigError(
                self.key,
                self.metric,
                f"not a metric of this run's evaluation ({', '.join(values)})",
            )
            error.on_every_rank = True  # type: ignore[attr-defined]  # same values everywhere
            raise error
        value, best = values[self.metric], self.state.get("value")
        if self.mode == "min":
            better = best is None or value < best - self.min_delta
        else:
            better = best is None or value > best + self.min_delta
        if better:
            self.state.update(value=value, step=step, evals_since=0)
        else:
            self.state["evals_since"] = self.state.get("evals_since", 0) + 1
        return better

    def describe(self) -> str:
        return f"{self.metric} {self.state['value']:.6g} at step {self.state['step']}"


class Watches:
    """The run's watched metrics: `update` after each evaluation says whether it is a new best
    to save, and sets `state.stopped_early` once early stopping's patience runs out."""

    def __init__(self, cfg: RunConfig, watches: dict[str, dict[str, Any]]) -> None:
        self.cfg, self.each = cfg, {}
        best, stop = cfg.checkpoint.best, cfg.train.early_stopping
        # checkpoint.enabled=false turns every save off, the best one included: a shipped config
        # that keeps a best checkpoint runs unsaved with that one override.
        if best.metric and cfg.checkpoint.enabled:
            state = watches.setdefault(BEST, {})
            key = "checkpoint.best.metric"
            self.each[BEST] = MetricWatch(key, best.metric, best.mode, 0.0, state)
        if stop.metric:
            state = watches.setdefault(EARLY, {})
            key = "train.early_stopping.metric"
            self.each[EARLY] = MetricWatch(key, stop.metric, stop.mode, stop.min_delta, state)

    def update(self, values: dict[str, float], state: Any) -> bool:
        """`state`: the TrainState (its step; its stopped_early is set here)."""
        new_best = BEST in self.each and self.each[BEST].update(values, state.step)
        if EARLY in self.each:
            self.each[EARLY].update(values, state.step)
            patience = self.cfg.train.early_stopping.patience
            out_of_patience = self.each[EARLY].state["evals_since"] >= patience
            state.stopped_early = out_of_patience and state.step < self.cfg.train.max_steps
        return new_best

    def early_stop_line(self, step: int) -> str:
        watch = self.each[EARLY]
        return (
            f"early stopping at step {step}: {watch.metric} did not improve by more than "
            f"{watch.min_delta:g} in {self.cfg.train.early_stopping.patience} evaluation(s); "
            f"best {watch.describe()}"
        )


def check_watched(cfg: RunConfig, has_val: bool, names: list[str] | None) -> None:
    """Up front, before anything is written: a watch needs a validation set, and a metric the
    evaluation reports (`names`; None: not known before the first evaluation)."""
    best = cfg.checkpoint.best.metric if cfg.checkpoint.enabled else None
    for key, metric in (
        ("checkpoint.best.metric", best),
        ("train.early_stopping.metric", cfg.train.early_stopping.metric),
    ):
        if metric and not has_val:
            raise ConfigError(key, metric, "this run has no validation set to evaluate")
        if metric and names is not None and metric not in names:
            raise ConfigError(
                key, metric, f"not a metric of this run's evaluation ({', '.join(names)})"
            )
