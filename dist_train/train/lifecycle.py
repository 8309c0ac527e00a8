"""The run directory's lifecycle: the state an earlier run left it in, and what the same command
does from each (the README's "Run lifecycle" table). `inspect_run_dir` decides, reading only,
before anything is built; `Start.apply` makes its moves into previous/<time>/ (never deleting)
once every check has passed, just before the run writes. The owner of the directory calls both.

"The same run" (which a crash before the first checkpoint restarts) is an earlier config.yaml
whose settings that a resume may not change (the INVARIANT ones, see `invariant_settings`) equal
this command's; the others (max_steps, intervals, lr, micro-batch, precision ...) may differ, as
they may on a resume.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dist_train.checkpoint.files import (
    STEP_DIR,
    complete_checkpoints,
    invariant_settings,
    read_manifest,
    resolve_resume,
    step_of,
)
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError
from dist_train.launch.rundir import PREVIOUS, holds_a_run, move_aside, remove_debris
from dist_train.track.metrics import METRICS, trim_metrics

# The states a run directory can be found in (running, i.e. locked, is RunLock's to refuse).
FRESH = "fresh"  # nothing of a run here: start at step 0
STOPPED = "stopped with a checkpoint"  # preempted, or crashed after a commit: resume
CRASHED = "crashed before any checkpoint"  # this run's records, no checkpoint: start over
FINISHED = "finished"  # at train.max_steps: done already, nothing written
STOPPED_EARLY = "stopped early"  # train.early_stopping ended it: done already
OVERWRITE = "set aside (train.overwrite)"  # whatever was here moves to previous/


@dataclass
class Start:
    """How this start continues the run directory, decided by `inspect_run_dir`."""

    run_dir: Path
    state: str
    resume_from: Path | None = None
    step: int = 0  # the step training starts from
    done: str | None = None  # nothing to train: the line said instead; nothing is written
    abandoned: list[Path] = field(default_factory=list)  # step folders newer than `step`

    def apply(self, say: Callable[[str], None] = print) -> None:
        """The owner's moves, just before the run writes; none for a run that is done."""
        if self.done is not None:
            return
        try:
            self._move(say)
        except OSError as e:
            raise ConfigError(
                "train.run_dir", str(self.run_dir), f"cannot move files aside ({e.strerror or e})"
            ) from None

    def _move(self, say: Callable[[str], None]) -> None:
        if self.state == OVERWRITE:
            target = move_aside(self.run_dir)  # the debris of its saves goes with it
            say(f"train.overwrite: moved the earlier run in {self.run_dir} aside to {target}")
            return
        remove_debris(self.run_dir, say)
        if self.state == CRASHED:
            found = ", ".join(holds_a_run(self.run_dir))
            say(
                f"{self.run_dir}: an earlier attempt of this run stopped before its first "
                f"checkpoint; moved its records ({found}) aside to {move_aside(self.run_dir)} "
                "and starting at step 0"
            )
        elif self.abandoned:
            self._set_lineage_aside(say)

    def _set_lineage_aside(self, say: Callable[[str], None]) -> None:
        """Resuming from an older step starts a new lineage: the newer checkpoints (with the
        `best` link when it points at one of them) and the records after the step move to
        previous/<time>/, so that `resume=auto` later continues this lineage, not that one."""
        root = self.run_dir / "checkpoints"
        entries = list(self.abandoned)
        best = root / "best"
        if best.is_symlink() and (root / os.readlink(best)) in self.abandoned:
            entries.append(best)  # its relative target moves along with it
        target = move_aside(self.run_dir, entries)
        moved = trim_metrics(self.run_dir, self.step, into=target / METRICS)
        records = f" and {moved} record(s) after step {self.step}" if moved else ""
        say(
            f"resuming from step {self.step}, older than the newest checkpoint: moved the "
            f"newer lineage ({', '.join(p.name for p in self.abandoned)}{records}) aside to "
            f"{target}; resume=auto continues this one"
        )


def inspect_run_dir(cfg: RunConfig) -> Start:
    """The state of `train.run_dir` and what this command does from it; raises ConfigError
    (before anything is built or written) where it must not start: an earlier run with other
    settings, or a fresh start asked over checkpoints. Reads only."""
    run_dir = Path(cfg.train.run_dir)
    if cfg.train.overwrite:
        return Start(run_dir, OVERWRITE if holds_a_run(run_dir) else FRESH)
    resume_from = resolve_resume(cfg)
    if resume_from is not None:
        return _resuming(cfg, run_dir, resume_from)
    found = holds_a_run(run_dir)
    if not found:
        return Start(run_dir, FRESH)
    return _without_checkpoint(cfg, run_dir, found)


def done_line(cfg: RunConfig, resume_from: Path, manifest: dict[str, Any]) -> str | None:
    """What a command says instead of training when its checkpoint leaves nothing to do."""
    step = manifest["step"]
    if manifest.get("trainer", {}).get("stopped_early"):
        return (
            f"done already: {cfg.train.run_dir} stopped early at step {step} "
            "(train.early_stopping); start over with train.overwrite=true"
        )
    if step >= cfg.train.max_steps:
        return (
            f"done already: {resume_from} is at step {step} (train.max_steps="
            f"{cfg.train.max_steps}); raise train.max_steps to train further"
        )
    return None


def _resuming(cfg: RunConfig, run_dir: Path, resume_from: Path) -> Start:
    manifest = read_manifest(resume_from)
    step = int(manifest["step"])
    done = done_line(cfg, resume_from, manifest)
    early = bool(manifest.get("trainer", {}).get("stopped_early"))
    state = STOPPED_EARLY if early else FINISHED if done else STOPPED
    root = run_dir / "checkpoints"
    newer = (
        sorted(
            (p for p in root.iterdir() if STEP_DIR.match(p.name) and step_of(p) > step), key=step_of
        )
        if root.is_dir()
        else []
    )
    return Start(run_dir, state, resume_from, step, done, newer)


def _without_checkpoint(cfg: RunConfig, run_dir: Path, found: list[str]) -> Start:
    """An earlier run and no checkpoint this command resumes: this run's first attempt that
    stopped before its first commit (start over, its records set aside), a checkpoint-less run
    that finished, or another run (refused)."""
    aside = f"to {run_dir / PREVIOUS}/<time>/ (nothing is deleted)"
    if complete_checkpoints(run_dir / "checkpoints"):  # resume=none over checkpoints
        raise ConfigError(
            "train.run_dir",
            str(run_dir),
            f"holds an earlier run ({', '.join(found)}) that this fresh start would mix with; "
            f"use a new train.run_dir, or train.overwrite=true to move the earlier run aside {aside}",
        )
    differs = _other_settings(cfg, run_dir)
    if differs:
        raise ConfigError(
            "train.run_dir",
            str(run_dir),
            f"holds an earlier run ({', '.join(found)}) without a checkpoint, {differs}; use a new "
            f"train.run_dir, or train.overwrite=true to move the earlier run aside {aside}",
        )
    if not cfg.checkpoint.enabled:
        last = _last_step(run_dir)
        if last >= cfg.train.max_steps:
            return Start(
                run_dir,
                FINISHED,
                step=last,
                done=f"done already: {run_dir} finished at step {last} (its metrics.jsonl; "
                "checkpoint.enabled=false: nothing to continue from); start over with "
                "train.overwrite=true",
            )
    return Start(run_dir, CRASHED)


def _other_settings(cfg: RunConfig, run_dir: Path) -> str | None:
    """Why the earlier run in run_dir is not this run (None when it is): its config.yaml is
    unreadable, or differs in settings a resume may not change."""
    path = run_dir / "config.yaml"
    try:
        earlier = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        earlier = None
    if not isinstance(earlier, dict):
        return "whose config.yaml is missing or unreadable, so it may be another run's"
    then, now = _plain(invariant_settings(cfg, earlier)), _plain(invariant_settings(cfg, cfg))
    diff = [
        f"{k} ({then.get(k)!r} -> {now.get(k)!r})"
        for k in sorted(set(then) | set(now))
        if then.get(k) != now.get(k)
    ]
    return f"with other settings: {', '.join(diff)}" if diff else None


def _plain(settings: dict[str, Any]) -> dict[str, Any]:
    """As JSON has them (tuples as lists), so that a YAML record and a live config compare."""
    return json.loads(json.dumps(settings, default=str))


def _last_step(run_dir: Path) -> int:
    """The last step metrics.jsonl has a record of (0: none)."""
    last = 0
    try:
        lines = (run_dir / METRICS).read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        try:
            last = max(last, int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue
    return last
