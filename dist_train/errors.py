"""User-facing errors, printed as one line, and the exit statuses every launcher recipe reads:
the one table of them (README, "Exit statuses")."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

EXIT_DONE = 0
EXIT_BUG = 1  # unexpected (a traceback): a bug, not retried
EXIT_INPUT = 2  # the user's input (config, command line, run directory): permanent
# Infrastructure a retry can fix: a peer, node or network lost, the store unreachable, a worker
# killed by a signal (the out-of-memory killer's SIGKILL). 138 is the one code the Kubeflow
# training-operator's ExitCode policy reserves for "retryable, chosen by the program" (its
# retryable set is 130, 137, 138 and 143, not all of 128-255); it reads as 128 + SIGUSR1, a
# signal dist-train always handles, so no process of ours dies of it.
EXIT_INFRA = 138
# Stopped by SIGTERM/SIGUSR1 after saving a checkpoint: resume with the same command. 128 +
# SIGTERM, what a scheduler expects from a job it sent SIGTERM to.
EXIT_PREEMPTED = 143
# A stop signal with checkpoint.enabled=false: nothing to resume from, so not "retry me".
EXIT_UNSAVED = 1
RETRYABLE = (EXIT_INFRA, EXIT_PREEMPTED)


class DistTrainError(Exception):
    """An error caused by user input, not by a bug in dist_train."""

    exit_code = EXIT_INPUT


class ConfigError(DistTrainError):
    """A config key holds a value that cannot work; names the key, the value and what would."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")


class NonFiniteError(DistTrainError):
    """Training produced a non-finite loss or weights; every rank raises it at the same step
    (decided through a collective), so only the main rank needs to print it."""

    on_every_rank = True


class InfraError(DistTrainError):
    """The machines, not the input: a peer or node lost, the network or the store unreachable.
    One line like any user-facing error, but a retry can fix it (EXIT_INFRA)."""

    exit_code = EXIT_INFRA


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
