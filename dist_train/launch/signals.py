"""Preemption: SIGTERM or SIGUSR1 (SLURM's warning ahead of a time limit) ends a run at the
next log step, on every rank at the same step, after one checkpoint; the exit status is 143.

The handler only records the signal (and rank 0 says so in one line); the loss all-reduce of
the next log step tells every rank (`Trainer.maybe_log`), and an evaluation under way checks at
micro-batch boundaries (`evaluation.stop_agreed`). No torch here: the CLI installs the handlers
before torch loads.
"""

from __future__ import annotations

import contextlib
import os
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
    the process at once; after it, the loop stops at the next log step (or an evaluation at its
    next stop check). A repeated signal changes nothing: schedulers and torchrun's agent may both
    deliver one. The first one armed prints the line given to `tell` at once, so that a user
    sees it was received long before the save line."""

    def __init__(self) -> None:
        self.signum = 0
        self.armed = False
        self._notice: str | None = None  # "{signal} received: ..." (None: say nothing)

    def install(self) -> None:
        for signum in PREEMPT_SIGNALS:
            signal.signal(signum, self._handle)

    def arm(self) -> None:
        self.armed = True

    def tell(self, notice: str | None) -> None:
        """What the first signal prints (`{signal}` is replaced by its name); None: nothing
        (ranks other than 0, so that a signal sent to every worker is one line)."""
        self._notice = notice

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if not self.armed:
            raise Terminated(signum)
        if self.signum:
            return
        self.signum = signum
        if self._notice:
            line = self._notice.replace("{signal}", signal.Signals(signum).name) + "\n"
            # os.write, not print: a handler may run while the main thread is inside a print
            # to the same stream, and a buffered stream refuses a reentrant write.
            with contextlib.suppress(OSError):  # stderr gone: the stop goes on regardless
                os.write(2, line.encode())
