"""Experiment trackers (TensorBoard, W&B, MLflow): one small class each, behind `Tracker`.

Only rank 0 builds them; metrics.jsonl stays the source of truth. Each imports its library in
its constructor, so this module needs none of them (config/backends.py checks they are there).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from dist_train.errors import ConfigError, DistTrainError, first_line
from dist_train.track.backend import Tracker

if TYPE_CHECKING:
    from dist_train.config.schema import LogConfig, RunConfig

IDS = "trackers.json"  # the W&B and MLflow run ids, so that a resumed run continues its runs


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


REACH_TIMEOUT_S = 5.0  # a tracking server that does not answer a connect in this is down


def check_reachable(log: LogConfig) -> None:
    """A remote MLflow server (`log.mlflow_uri` over http/https) must accept a connection:
    checked before the run writes anything, in seconds, instead of MLflow's own retries
    (minutes) after the run directory was written."""
    uri = log.mlflow_uri
    if "mlflow" not in log.backends or not uri.startswith(("http://", "https://")):
        return
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigError("log.mlflow_uri", uri, "has an invalid port") from None
    if not parts.hostname:
        raise ConfigError("log.mlflow_uri", uri, "names no host")
    try:
        socket.create_connection((parts.hostname, port), timeout=REACH_TIMEOUT_S).close()
    except OSError as e:
        timed_out = isinstance(e, TimeoutError)
        why = f"no answer within {REACH_TIMEOUT_S:g} s" if timed_out else (e.strerror or str(e))
        raise ConfigError(
            "log.mlflow_uri",
            uri,
            f"cannot reach {parts.hostname}:{port} ({why}); start "
            "the tracking server, or leave log.mlflow_uri empty for a store in the run directory",
        ) from None


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
    from dist_train.track.tensorboard_tracker import TensorBoardTracker

    # Events after the resumed step belong to the attempt that was cut short: TensorBoard
    # hides them (its purge_step), as trim_metrics moves them out of metrics.jsonl.
    purge = resumed_step + 1 if resumed_step is not None else None
    return TensorBoardTracker(run_dir / "tensorboard", hparams, purge)


def _wandb(cfg: RunConfig, run_dir: Path, hparams: dict[str, Any], run_id: str | None) -> Tracker:
    from dist_train.track.wandb_tracker import WandbTracker

    log = cfg.log
    return WandbTracker(
        run_dir, hparams, log.project, log.wandb_entity, log.wandb_mode, run_id, run_dir.name
    )


def _mlflow(cfg: RunConfig, run_dir: Path, hparams: dict[str, Any], run_id: str | None) -> Tracker:
    from dist_train.track.mlflow_tracker import MlflowTracker

    uri = cfg.log.mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
    # Artifacts (none are logged yet) inside the run directory too, for the default store only.
    artifacts = None if cfg.log.mlflow_uri else (run_dir / "mlflow-artifacts").resolve().as_uri()
    return MlflowTracker(uri, cfg.log.project, run_dir.name, hparams, run_id, artifacts)
