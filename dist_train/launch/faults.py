"""A deterministic fault for tests: `DIST_TRAIN_FAULT=<point>@<step>[:<signal>][:rank<R>]` sends
a signal when rank R (default 0) reaches that point at that step, once per process, so a test
kills or stops a run at an exact moment instead of after a sleep. Unset, no step checks for it:
`Progress` is then the plain one; a save, a commit and retention each test one `None`.
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass

from dist_train.errors import ConfigError
from dist_train.launch.signals import StopRequest
from dist_train.launch.watch import Progress

FAULT_ENV = "DIST_TRAIN_FAULT"
# Where a fault can strike: start-up (at the step the attempt trains first, just before the
# loop), the training phases that `Progress.enter` reports, and in a checkpoint: a synchronous
# save with this rank's shards written but not yet DCP's `.metadata` (sync-save); a background
# save just started, its write under way (async-save: on the training thread, so a stop signal
# is acted on at a known step); the manifest written but the folder not yet renamed into place
# (commit); an older checkpoint renamed to `.del_*`, not yet deleted (retention). Saves, commit
# and retention count the checkpoint's step.
POINTS = (
    "start-up",
    "data",
    "forward/backward",
    "optimizer",
    "log",
    "evaluation",
    "checkpoint",
    "sync-save",
    "async-save",
    "commit",
    "retention",
)
FORWARD_WAIT_S = 30.0  # the most a worker waits for its launcher to forward the signal back


@dataclass
class Fault:
    """One point, step (counted as the logs count: 1 is the first step), signal and rank."""

    point: str
    step: int
    signum: int = signal.SIGKILL
    rank: int = 0
    stop: StopRequest | None = None  # this process's: a forwarded stop signal lands there
    fired: bool = False

    def reached(self, point: str, step: int) -> None:
        """Called where `point` is reached at `step`; acts the first time they match."""
        if self.fired or point != self.point or step != self.step:
            return
        self.fired = True
        if self.signum == signal.SIGKILL or "TORCHELASTIC_RUN_ID" not in os.environ:
            os.kill(os.getpid(), self.signum)  # one process: a scheduler signals it
            return
        # A worker under torchrun's agent (our --nproc launcher): a scheduler signals the
        # launcher, whose agent forwards the signal to every worker. Wait for it to arrive
        # here, so the stop is acted on as if it had come at this point.
        os.kill(os.getppid(), self.signum)
        deadline = time.monotonic() + FORWARD_WAIT_S
        while self.stop is not None and not self.stop.signum and time.monotonic() < deadline:
            time.sleep(0.01)


def parse_fault(text: str | None) -> Fault | None:
    """`point@step[:signal][:rankR]` (signal: KILL, TERM, USR1, INT, with or without SIG), or
    None when unset or empty; a malformed value is a ConfigError naming the variable."""
    if not text:
        return None
    head, *options = text.split(":")
    point, _, step = head.rpartition("@")
    if point not in POINTS or not step.isdigit():
        raise ConfigError(
            FAULT_ENV,
            text,
            f"expected POINT@STEP[:SIGNAL][:rankR], POINT one of {', '.join(POINTS)}",
        )
    fault = Fault(point, int(step))
    for option in options:
        if option.startswith("rank") and option[4:].isdigit():
            fault.rank = int(option[4:])
            continue
        name = option.upper() if option.upper().startswith("SIG") else f"SIG{option.upper()}"
        if name not in ("SIGKILL", "SIGTERM", "SIGUSR1", "SIGINT"):
            raise ConfigError(
                FAULT_ENV, text, f"unknown option {option!r}: KILL, TERM, USR1, INT or rankR"
            )
        fault.signum = signal.Signals[name]
    return fault


def fault_for(rank: int, stop: StopRequest | None = None) -> Fault | None:
    """This process's fault (DIST_TRAIN_FAULT), or None: unset, or meant for another rank."""
    fault = parse_fault(os.environ.get(FAULT_ENV))
    if fault is None or fault.rank != rank:
        return None
    fault.stop = stop
    return fault


class FaultyProgress(Progress):
    """Progress that also strikes the fault where a phase is entered: a class of its own, so
    that a run without a fault pays nothing per step, not even a check."""

    def __init__(self, fault: Fault) -> None:
        super().__init__()
        self.fault = fault

    def enter(self, phase: str, step: int, micro: int = 0) -> None:
        self.at = (step, micro, phase, time.monotonic())
        self.fault.reached(phase, step + 1)  # Progress counts from 0, faults as the logs


def progress_for(fault: Fault | None) -> Progress:
    """The rank's progress (see watch.py): the plain one unless a fault is set for it."""
    return Progress() if fault is None else FaultyProgress(fault)
