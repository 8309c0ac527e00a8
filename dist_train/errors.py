"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class DistTrainError(Exception):
    """An error caused by user input, not by a bug in dist_train."""


class ConfigError(DistTrainError):
    """A config key holds a value that cannot work; names the key, the value and what would."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")


class NonFiniteError(DistTrainError):
    """Training produced a non-finite loss or weights; every rank raises it at the same step
    (decided through a collective), so only the main rank needs to print it."""

    on_every_rank = True


class PeerError(DistTrainError):
    """Raised on the other ranks when the main rank hit a user error that ends the run for
    all; the main rank prints the real message, these stay quiet."""

    on_every_rank = True


def first_line(error: BaseException) -> str:
    """An exception as one line: the last non-empty line of its message (torch's errors put
    the reason last, after the C++ location)."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(error).__name__


# Optional packages (a `_target_` may name them, or a command needs them), and the extra of ours
# that installs them.
EXTRAS = {"transformers": "hf", "matplotlib": "report"}


def install_hint(error: ImportError) -> str:
    """'; pip install ...' when the missing module is an optional dependency of ours."""
    extra = EXTRAS.get((error.name or "").partition(".")[0])
    return f"; pip install 'dist-train[{extra}]'" if extra else ""


def import_extra(module: str, extra: str, key: str, value: Any, purpose: str) -> ModuleType:
    """Import an optional dependency, or a ConfigError naming the `pip install` that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            key, value, f"{purpose} needs {module.split('.')[0]}: pip install 'dist-train[{extra}]'"
        ) from None
