"""Preemption: SIGTERM or SIGUSR1 (SLURM's warning ahead of a time limit) ends a run at the
next log step, on every rank at the same step, after one checkpoint; the exit status is 143.

The handler only records the signal; the loss all-reduce of the next log step tells every
rank (`Trainer.maybe_log`). No torch here: the CLI installs the handlers before torch loads.
"""

from __future__ import annotations

import signal
from types import FrameType

# The exit statuses live in one table (dist_train.errors); these two are a stop signal's.
from dist_train.errors import EXIT_PREEMPTED, EXIT_UNSAVED

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Terminated(BaseException):
    """A stop signal before the training loop runs (nothing to save yet): the run leaves
    through its normal exit path (lock released, process group destroyed). A BaseException, so
    that no `except Exception` in user code swallows it."""


class Preempted(BaseException):
    """Raised on every rank at the same step once the stop checkpoint is written."""

    def __init__(self, signum: int, step: int, saved: str | None) -> None:
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved = signum, step, saved

    def message(self) -> str:
        name = signal.Signals(self.signum).name if self.signum else "a stop signal"
        if not self.saved:
            return (
                f"stopped ({name}) at step {self.step}: nothing saved (checkpoint.enabled="
                f"false; exit status {EXIT_UNSAVED})"
            )
        return (
            f"preempted ({name}) at step {self.step}: saved {self.saved}; run the same command "
            f"to continue (exit status {EXIT_PREEMPTED})"
        )


class StopRequest:
    """Records SIGTERM/SIGUSR1. Before `arm()` (start-up: nothing to save yet) a signal stops
    the process at once; after it, the loop stops at the next log step. A repeated
    signal changes nothing: schedulers and torchrun's agent may both deliver one."""

    def __init__(self) -> None:
        self.signum = 0
        self.armed = False

    def install(self) -> None:
        for signum in PREEMPT_SIGNALS:
            signal.signal(signum, self._handle)

    def arm(self) -> None:
        self.armed = True

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.armed:
            raise Terminated(signum)
        self.signum = self.signum or signum
