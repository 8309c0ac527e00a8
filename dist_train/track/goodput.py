"""Goodput: where a run's wall time went, read back from metrics.jsonl and metrics.discarded.jsonl
alone (README "Goodput"); goodput = productive step time / wall time. No torch here:
`dist-train report` reads it without loading torch."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dist_train.track.summary import RUN_END, RUN_START

METRICS = "metrics.jsonl"
DISCARDED = "metrics.discarded.jsonl"  # records of attempts that a resume rolled back
CATEGORIES = {  # key: label, in the order the report lists them
    "productive": "productive steps",
    "data_wait": "data wait",
    "checkpoint": "checkpoint blocking",
    "evaluation": "evaluation",
    "startup": "start-up and restarts",
    "lost": "lost work",
    "other": "other",
}
Record = dict[str, Any]


@dataclass
class Goodput:
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    between: float = 0.0  # between attempts, when no process of the run ran: not in the wall
    attempts: int = 0  # processes that trained (a `run_start` record each)
    restarts: int = 0  # of them, started by torchrun's agent after a failure (--max-restarts)

    @property
    def wall(self) -> float:
        """The attempts' wall time, from each one's start to its last record: the categories
        add up to it by construction ("other" holds what no record explains)."""
        return sum(self.seconds.values())

    @property
    def goodput(self) -> float:
        return self.seconds["productive"] / self.wall if self.wall > 0 else 0.0


@dataclass
class Attempt:
    """One process's training: when its command started, when its loop started (Unix times) and
    at which step, and its timed records (log records and `run_end`; evaluations), each with
    whether it was kept (metrics.jsonl) or rolled back (metrics.discarded.jsonl)."""

    launched: float
    loop: float
    step: int
    restart: int
    marks: list[tuple[float, Record, bool]] = field(default_factory=list)
    evals: list[tuple[float, float, bool]] = field(default_factory=list)  # (time, seconds, kept)

    def add(self, at: float, record: Record, kept: bool) -> None:
        if "eval_sec" in record:
            self.evals.append((at, number(record, "eval_sec"), kept))
        elif "elapsed_sec" in record or RUN_END in record:
            self.marks.append((at, record, kept))

    def end(self) -> float:
        return max([self.loop, *(t for t, _, _ in self.marks), *(t for t, _, _ in self.evals)])


def read_records(path: Path) -> list[Record]:
    """A metrics file's records in file order; a line that does not parse (a run killed
    mid-write) is skipped, not fatal; a missing file has none."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def number(record: Record, key: str) -> float:
    value = record.get(key)
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def attempt_of(record: Record) -> Attempt | None:
    """The attempt a `run_start` record opens; None for other records, and for a run_start
    written before runs recorded their clock."""
    facts = record.get(RUN_START)
    if not isinstance(facts, dict) or not all(
        isinstance(facts.get(k), int | float) for k in ("launched_at", "loop_start")
    ):
        return None
    restart = facts.get("restart")
    return Attempt(
        float(facts["launched_at"]),
        float(facts["loop_start"]),
        record["step"],
        restart if isinstance(restart, int) else 0,
    )


def attempts(kept: list[Record], discarded: list[Record]) -> list[Attempt]:
    """The attempts in the order they ran, each with its records from both files: a record
    belongs to the attempt whose loop started last before it was written (one process owns a
    run directory at a time), whichever file a resume left it in."""
    tagged = [(r, True) for r in kept] + [(r, False) for r in discarded]
    found = sorted((a for r, _ in tagged if (a := attempt_of(r))), key=lambda a: a.loop)
    starts = [a.loop for a in found]
    for record, is_kept in tagged:
        at = record.get("wall_time")
        if RUN_START in record or not isinstance(at, int | float):
            continue
        i = bisect.bisect_right(starts, at) - 1
        if i >= 0:  # else: older than every recorded start (written before runs had a clock)
            found[i].add(float(at), record, is_kept)
    return found


def interval_parts(
    record: Record, kept: bool, span: tuple[float, int], evals: tuple[float, float]
) -> dict[str, float]:
    """One interval's seconds by category, ending at `record` (a log record, `run_end`, or {}
    for the unexplained tail of an attempt that crashed). `span`: (its seconds, its steps);
    `evals`: (seconds of kept, of rolled-back evaluations in it)."""
    (seconds, steps), (kept_eval, lost_eval) = span, evals
    checkpoint = number(record, "checkpoint_sec")
    evaluation = kept_eval + number(record, "sample_sec")  # the end-of-run sample evaluates too
    parts = {"checkpoint": checkpoint, "evaluation": evaluation}
    if not kept:  # steps a resume threw away: all but the saves and kept evaluations in it
        parts["lost"] = seconds - checkpoint - evaluation
        return parts
    parts["lost"] = lost_eval + number(record, "lost_sec")
    if "step_sec" in record:
        parts["data_wait"] = number(record, "data_wait_sec") * steps
        # The loop's own interval (step_sec) starts after the previous record was written:
        # writing it (file, console, trackers) is the rest.
        parts["other"] = max(0.0, seconds - number(record, "step_sec") * steps)
        parts["productive"] = seconds - sum(parts.values())
    else:
        parts["other"] = seconds - sum(parts.values())
    return parts


def account_attempt(attempt: Attempt, begin: float, into: Goodput) -> None:
    """Add one attempt, from `begin` (its command's start, or the end of the attempt before it
    when torchrun restarted it) to its last record, into `into`."""
    into.seconds["startup"] += max(0.0, attempt.loop - begin)
    marks = sorted(attempt.marks, key=lambda m: m[0])
    end = attempt.end()
    if not marks or marks[-1][0] < end:  # evaluations after the last record: a crash's tail
        marks.append((end, {}, True))
    evals = sorted(attempt.evals)
    last, step = attempt.loop, attempt.step
    for at, record, kept in marks:
        inside = [(s, k) for t, s, k in evals if last < t <= at]
        kept_eval = sum(s for s, k in inside if k)
        lost_eval = sum(s for s, k in inside if not k)
        steps = record["step"] - step if "step_sec" in record else 0
        parts = interval_parts(record, kept, (at - last, steps), (kept_eval, lost_eval))
        for key, value in parts.items():
            into.seconds[key] += value
        last, step = at, record.get("step", step)


def account(run_dir: Path) -> Goodput:
    """The run's accounting over all its attempts (`attempts` 0: nothing was recorded with a
    clock). Time between attempts with no process running (a job in a queue, a command run
    again a day later) is `between`, outside the wall time."""
    kept, discarded = read_records(run_dir / METRICS), read_records(run_dir / DISCARDED)
    result, previous = Goodput(), None
    for attempt in attempts(kept, discarded):
        begin = attempt.launched
        if previous is not None:
            # A restarted group's launcher started before the failed attempt ended: its
            # start-up counts from that end. A new command's starts later: the gap is between.
            result.between += max(0.0, attempt.launched - previous)
            begin = max(begin, previous)
        account_attempt(attempt, begin, result)
        result.attempts += 1
        result.restarts += attempt.restart > 0
        previous = max(attempt.end(), begin)
    return result


def goodput_of(run_dir: Path) -> float | None:
    """Productive step time over wall time, None when the run recorded no clock."""
    result = account(run_dir)
    return result.goodput if result.attempts else None
