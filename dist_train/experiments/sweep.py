"""`dist-train sweep`: the variants of a grid trained one after another, each by its own
`dist-train train` process in SWEEP_DIR/<name>/, then a summary (printed, and summary.csv).

A process per variant isolates them: one that crashes or is misconfigured is recorded as failed
and the sweep goes on. A rerun skips the variants that are done and runs the others again,
which resume from their newest checkpoint (`resume=auto`). Stop signals reach the running
variant (it saves, as `train` does) and end the sweep with the status `train` would give.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.errors import ConfigError, DistTrainError, first_line
from dist_train.experiments.grid import Grid, Variant, parse_grid, pin_grid, sweep_record
from dist_train.experiments.results import (
    METRICS,
    eval_keys,
    format_table,
    read_metrics,
    summarize,
    write_atomic,
    write_csv,
)
from dist_train.launch.child import Forwarder, run_child
from dist_train.launch.rundir import holds_a_run, owned_run_dir
from dist_train.launch.signals import EXIT_PREEMPTED

STATUS_FILE, SUMMARY_FILE, LOGS = "status.json", "summary.csv", "logs"
DONE, FAILED, INTERRUPTED, PENDING = "done", "failed", "interrupted", "pending"
Say = Callable[[str], None]


@dataclass(frozen=True)
class SweepArgs:
    config: str
    overrides: Sequence[str]
    sweep_dir: str | None = None  # default: the config's train.run_dir
    nproc: int | None = None  # passed on to every `dist-train train`


def train_command(args: SweepArgs, grid: Grid, variant: Variant, run_dir: Path) -> list[str]:
    """The same checkout's `dist-train train` (this interpreter, `-m`), the variant's overrides
    after the fixed ones, and its own run directory last."""
    cmd = [sys.executable, "-m", "dist_train", "train", args.config, *grid.fixed]
    cmd += [*variant.overrides, f"train.run_dir={run_dir}"]
    return cmd + (["--nproc", str(args.nproc)] if args.nproc is not None else [])


def invalid_variants(args: SweepArgs, grid: Grid, root: Path) -> dict[str, DistTrainError]:
    """Each variant's config checked here, before any process starts. When every variant is
    invalid the grid itself is wrong: that is the sweep's error (exit 2), not a summary."""
    from dist_train.config.load import load_config

    variants = grid.variants()
    invalid = {}
    for v in variants:
        try:
            load_config(args.config, [*grid.fixed, *v.overrides, f"train.run_dir={root / v.name}"])
        except DistTrainError as e:
            invalid[v.name] = e
    if len(invalid) == len(variants):
        raise next(iter(invalid.values()))
    return invalid


def sweep_dir(args: SweepArgs, grid: Grid) -> tuple[Path, str]:
    """The sweep directory and the setting that named it."""
    from dist_train.config.load import load_config

    cfg = load_config(args.config, grid.fixed)  # the fixed overrides' errors, once
    if args.nproc is not None and args.nproc < 1:
        raise ConfigError("--nproc", args.nproc, "must be >= 1")
    root, key = (
        (args.sweep_dir, "--dir") if args.sweep_dir else (cfg.train.run_dir, "train.run_dir")
    )
    found = holds_a_run(Path(root))
    if found:
        raise ConfigError(
            key,
            root,
            f"holds a training run ({', '.join(found)}); a sweep needs a directory of its own: --dir",
        )
    return Path(root), key


def run_sweep(args: SweepArgs, say: Say = print) -> int:
    """Check the grid, take the sweep directory, run what is not done; the exit status."""
    from dist_train.config.yaml_io import resolve_config_path

    grid = parse_grid(args.overrides)
    root, key = sweep_dir(args, grid)
    invalid = invalid_variants(args, grid, root)
    with owned_run_dir(root, say, key), Forwarder().installed() as fwd:
        pin_grid(root, sweep_record(resolve_config_path(args.config), grid), key, say)
        return Sweep(args, grid, root, invalid, fwd, say).run()


class Sweep:
    """One pass over the variants, in grid order, with the record of earlier passes."""

    def __init__(
        self,
        args: SweepArgs,
        grid: Grid,
        root: Path,
        invalid: dict[str, DistTrainError],
        fwd: Forwarder,
        say: Say,
    ) -> None:
        self.args, self.grid, self.root, self.invalid = args, grid, root, invalid
        self.fwd, self.say = fwd, say
        self.variants = grid.variants()
        self.status = read_status(root)  # name -> status, exit_code, message, wall_sec

    def is_done(self, v: Variant) -> bool:
        """Recorded done, and its run is still there (a deleted run dir trains again)."""
        recorded = self.status.get(v.name, {}).get("status")
        return recorded == DONE and (self.root / v.name).is_dir()

    def run(self) -> int:
        done = sum(map(self.is_done, self.variants))
        self.say(
            f"sweep: {len(self.variants)} variants in {self.root} ({done} done already, "
            f"{len(self.variants) - done} to run)"
        )
        for i, v in enumerate(self.variants, 1):
            if self.fwd.signum:  # stopped: the rest stay pending
                break
            tag = f"[{i}/{len(self.variants)}] {v.name}"
            if self.is_done(v):
                self.say(f"sweep: {tag}: done already, skipped")
                continue
            wall = self.status.get(v.name, {}).get("wall_sec") or 0.0
            status, code, message, wall = self.run_variant(i, tag, v, wall)
            self.status[v.name] = {
                "status": status,
                "exit_code": code,
                "message": message,
                "wall_sec": wall,
            }
            self.say(f"sweep: {tag}: {status}" + (f": {message}" if status != DONE else ""))
            text = json.dumps(self.status, indent=1) + "\n"
            write_atomic(self.root / STATUS_FILE, lambda tmp, text=text: tmp.write_text(text))
            self.summary()
        return self.finish()

    def run_variant(self, i: int, tag: str, v: Variant, wall: float) -> tuple[str, int, str, float]:
        """(status, exit status, message, wall seconds over all its attempts)."""
        if v.name in self.invalid:  # found before starting: no process
            return FAILED, 2, first_line(self.invalid[v.name]), wall
        cmd = train_command(self.args, self.grid, v, self.root / v.name)
        self.say(f"sweep: {tag}: dist-train {shlex.join(cmd[3:])}")
        start = time.monotonic()
        log = self.root / LOGS / f"{v.name}.log"
        code, message = run_child(cmd, log, f"[{i}] ", self.fwd, self.say)
        wall += time.monotonic() - start
        if code == 0:
            return DONE, code, message, wall
        stopped = self.fwd.signum or code == EXIT_PREEMPTED  # a checkpoint to resume from
        return (INTERRUPTED if stopped else FAILED), code, message, wall

    def summary(self) -> tuple[list[str], list[dict[str, Any]]]:
        """One row per variant: its varying overrides, status, last step and train loss, final
        and best of every eval metric, wall time; written to SWEEP_DIR/summary.csv. Returns the
        columns to print and the rows."""
        runs = {
            v.name: read_metrics(self.root / v.name)
            if (self.root / v.name / METRICS).is_file()
            else []
            for v in self.variants
        }
        metrics = eval_keys(list(runs.values()))
        rows = []
        for v in self.variants:
            recorded = self.status.get(v.name, {})
            rows.append(
                {
                    "name": v.name,
                    **dict(word.split("=", 1) for word in v.overrides),
                    "status": recorded.get("status", PENDING),
                    **summarize(runs[v.name], metrics),
                    "wall_sec": recorded.get("wall_sec"),
                    "exit_code": recorded.get("exit_code"),
                    "message": recorded.get("message", ""),
                }
            )
        axes = [key for key, _ in self.grid.axes]
        values = [m for metric in metrics for m in (metric, f"best {metric}")]
        results = ["status", "steps", "loss", *values, "wall_sec"]
        write_csv(self.root / SUMMARY_FILE, ["name", *axes, *results, "exit_code", "message"], rows)
        return [*(axes or ["name"]), *results], rows

    def finish(self) -> int:
        """Print the table and the line that says how the sweep ended; return its exit status:
        0 all done, 1 some failed, 130/143 stopped by Ctrl-C/a stop signal (rerun to resume)."""
        columns, rows = self.summary()
        self.say(format_table(columns, rows))
        for row in rows:
            if row["status"] in (FAILED, INTERRUPTED):
                self.say(
                    f"{row['status']}: {row['name']} (exit {row['exit_code']}): {row['message']}"
                )
        counts = {
            s: sum(r["status"] == s for r in rows) for s in (DONE, FAILED, INTERRUPTED, PENDING)
        }
        tally = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        where = f"summary in {self.root / SUMMARY_FILE}"
        if self.fwd.signum:
            code = 130 if self.fwd.signum == signal.SIGINT else EXIT_PREEMPTED
            name = signal.Signals(self.fwd.signum).name
            resume = f"run the same command to resume ({where}; exit status {code})"
            self.say(f"sweep: stopped by {name}: {tally}; {resume}")
            return code
        code = 1 if counts[FAILED] else 0
        self.say(f"sweep: {tally} (of {len(rows)} variants); {where} (exit status {code})")
        return code


def read_status(root: Path) -> dict[str, dict[str, Any]]:
    try:
        return json.loads((root / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}  # none yet, or unreadable: every variant runs (and a done one says so)
