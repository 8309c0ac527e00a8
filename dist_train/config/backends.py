"""Which `log.backends` exist and what each needs installed: checked before a run starts (and
by `dist-train check`), without importing any tracker library."""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING

from dist_train.errors import ConfigError

if TYPE_CHECKING:
    from dist_train.config.schema import LogConfig

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
