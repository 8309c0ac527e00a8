"""The loop's host clock for goodput (README "Goodput"): Unix times of records on one monotonic
origin, and the seconds spent since the last record in what is not training (checkpoint saves,
the end-of-run sample, evaluations a stop cut short). Rank 0's clock only; nothing here syncs a
device or reaches another rank."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

# A record's sums since the last one (zero ones left out): seconds the loop waited for
# checkpoints (saving, staging, committing a background save), generated the end-of-run sample,
# and spent in evaluations that a stop cut short (run again after the resume: bought nothing).
SUMS = ("checkpoint_sec", "sample_sec", "lost_sec")


class RunClock:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """The loop starts now: `elapsed_sec` counts from here."""
        self.start = time.perf_counter()
        self.epoch = time.time()  # the same instant as a Unix time
        self.sums = dict.fromkeys(SUMS, 0.0)

    def wall_time(self, elapsed: float | None = None) -> float:
        """Unix time `elapsed` seconds after the start (default: now), counted on the monotonic
        clock, so that a step of the system clock (NTP) mid-run moves no record."""
        if elapsed is None:
            elapsed = time.perf_counter() - self.start
        return self.epoch + elapsed

    def timing(self) -> dict[str, float]:
        """The `run_start` record's clock fact: the Unix time `elapsed_sec` counts from."""
        return {"loop_start": self.epoch}

    @contextmanager
    def counting(self, key: str) -> Iterator[None]:
        """Around what holds the loop: its seconds go to the next record's `key` (of SUMS)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.sums[key] += time.perf_counter() - began

    @contextmanager
    def evaluating(self) -> Iterator[dict[str, float]]:
        """Around an evaluation: fills the dict it yields with the evaluation record's fields
        (`eval_sec`, `wall_time`). One that raises (a stop cut it short) goes to `lost_sec`."""
        began, took = time.perf_counter(), {}
        try:
            yield took
        except BaseException:
            self.sums["lost_sec"] += time.perf_counter() - began
            raise
        took.update(eval_sec=time.perf_counter() - began, wall_time=self.wall_time())

    def since_record(self, elapsed: float | None = None) -> dict[str, float]:
        """A record's accounting fields (written `elapsed` seconds after the start, default now),
        then the sums start again for the next one."""
        fields = {"wall_time": self.wall_time(elapsed)}
        fields |= {key: seconds for key, seconds in self.sums.items() if seconds}
        self.sums = dict.fromkeys(SUMS, 0.0)
        return fields
