"""Experiment trackers (TensorBoard, W&B, MLflow): one small class each, behind `Tracker`.

Only rank 0 builds them; metrics.jsonl stays the source of truth. Each imports its library in
its constructor, so this module (imported by config validation) needs none of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dist_train.errors import ConfigError, DistTrainError, first_line

if TYPE_CHECKING:
    from dist_train.config import LogConfig, RunConfig

# name -> (modules it imports, the extra of ours that installs them); jsonl/console are built in.
BACKENDS: dict[str, tuple[tuple[str, ...], str]] = {
    "jsonl": ((), ""),
    "console": ((), ""),
    "tensorboard": (("tensorboard",), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "mlflow": (("mlflow",), "mlflow"),
}
# MLflow's sqlite store (our default) also needs these; mlflow-skinny does not bring them.
SQLITE_MODULES = ("sqlalchemy", "alembic")
WANDB_MODES = ("offline", "online")
IDS = "trackers.json"  # the W&B and MLflow run ids, so that a resumed run continues its runs


class Backend(Protocol):
    """One destination of metrics records (metrics.jsonl, the console, a tracker)."""

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: `step` and any other keys (not a fixed list)."""

    def close(self, finished: bool) -> None:
        """`finished`: the run reached train.max_steps (else it stopped or failed)."""


class Tracker(Backend, Protocol):
    """An experiment tracker, on rank 0 only; the hyperparameters go in at construction."""

    run_id: str | None  # kept in RUN_DIR/trackers.json for a resume to continue (None: nothing)


def required_modules(cfg: LogConfig, name: str) -> tuple[str, ...]:
    modules, _ = BACKENDS[name]
    if name == "mlflow" and (not cfg.mlflow_uri or cfg.mlflow_uri.startswith("sqlite:")):
        return modules + SQLITE_MODULES
    return modules


def validate_trackers(cfg: LogConfig) -> None:
    """Unknown backends and missing libraries, before anything starts (also `dist-train check`)."""
    names = list(cfg.backends)
    for name in names:
        if name not in BACKENDS:
            raise ConfigError(
                "log.backends",
                names,
                f"unknown backend {name!r}; expected any of {', '.join(BACKENDS)}",
            )
        missing = [m for m in required_modules(cfg, name) if importlib.util.find_spec(m) is None]
        if missing:
            raise ConfigError(
                "log.backends",
                names,
                f"{name} needs {' and '.join(missing)}, not installed here: "
                f"pip install 'dist-train[{BACKENDS[name][1]}]'",
            )
    if cfg.wandb_mode not in WANDB_MODES:
        raise ConfigError(
            "log.wandb_mode", cfg.wandb_mode, f"expected one of {', '.join(WANDB_MODES)}"
        )


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, without `step`: what trackers plot. None and NaN/inf are
    left out here (metrics.jsonl writes them as null and names them in `nonfinite`)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "step"
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def flat_config(cfg: RunConfig) -> dict[str, bool | int | float | str]:
    """The resolved config as `section.key` -> value; lists, dicts and None as JSON text, the
    one form that every tracker accepts."""
    flat: dict[str, bool | int | float | str] = {}
    for name, value in dataclasses.asdict(cfg).items():
        items = value.items() if isinstance(value, dict) else [("", value)]
        for key, item in items:
            dotted = f"{name}.{key}" if key else name
            flat[dotted] = item if isinstance(item, bool | int | float | str) else json.dumps(item)
    return flat


def read_ids(run_dir: Path) -> dict[str, str]:
    try:
        return json.loads((run_dir / IDS).read_text())
    except (OSError, ValueError):
        return {}


def write_ids(run_dir: Path, ids: dict[str, str]) -> None:
    tmp = run_dir / (IDS + ".tmp")
    tmp.write_text(json.dumps(ids, indent=1) + "\n")
    os.replace(tmp, run_dir / IDS)


def build_trackers(cfg: RunConfig, run_dir: Path, resumed_step: int | None) -> list[Tracker]:
    """The configured trackers, each given the resolved config once. `resumed_step`: the
    checkpoint step a resumed run starts from (its trackers continue the same runs), None for a
    fresh run. A tracker that cannot start ends the run in one line, naming it."""
    log, hparams = cfg.log, flat_config(cfg)
    ids = read_ids(run_dir) if resumed_step is not None else {}
    makers: dict[str, Callable[[], Tracker]] = {
        "tensorboard": lambda: _tensorboard(run_dir, hparams, resumed_step),
        "wandb": lambda: _wandb(cfg, run_dir, hparams, ids.get("wandb")),
        "mlflow": lambda: _mlflow(cfg, run_dir, hparams, ids.get("mlflow")),
    }
    trackers: list[Tracker] = []
    try:
        for name in dict.fromkeys(log.backends):  # in order, each once
            if name in makers:
                trackers.append(_start(name, makers[name]))
                if trackers[-1].run_id is not None:
                    ids[name] = trackers[-1].run_id
    except BaseException:
        for tracker in trackers:
            tracker.close(finished=False)
        raise
    if ids:
        write_ids(run_dir, ids)
    return trackers


def _start(name: str, make: Callable[[], Tracker]) -> Tracker:
    try:
        return make()
    except DistTrainError:
        raise
    except Exception as e:  # the library's own error (no login, bad URI, ...): one line
        raise ConfigError("log.backends", name, f"could not start: {first_line(e)}") from None


def _tensorboard(run_dir: Path, hparams: dict[str, Any], resumed_step: int | None) -> Tracker:
    from dist_train.trackers.tensorboard_tracker import TensorBoardTracker

    # Events after the resumed step belong to the attempt that was cut short: TensorBoard
    # hides them (its purge_step), as trim_metrics moves them out of metrics.jsonl.
    purge = resumed_step + 1 if resumed_step is not None else None
    return TensorBoardTracker(run_dir / "tensorboard", hparams, purge)


def _wandb(cfg: RunConfig, run_dir: Path, hparams: dict[str, Any], run_id: str | None) -> Tracker:
    from dist_train.trackers.wandb_tracker import WandbTracker

    log = cfg.log
    return WandbTracker(
        run_dir, hparams, log.project, log.wandb_entity, log.wandb_mode, run_id, run_dir.name
    )


def _mlflow(cfg: RunConfig, run_dir: Path, hparams: dict[str, Any], run_id: str | None) -> Tracker:
    from dist_train.trackers.mlflow_tracker import MlflowTracker

    uri = cfg.log.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    # Artifacts (none are logged yet) inside the run directory too, for the default store only.
    artifacts = None if cfg.log.mlflow_uri else (run_dir / "mlflow-artifacts").resolve().as_uri()
    return MlflowTracker(uri, cfg.log.project, run_dir.name, hparams, run_id, artifacts)
