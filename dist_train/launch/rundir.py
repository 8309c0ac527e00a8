"""One owner per run directory: an exclusive-create lock file, and the owner's start-up duties
(refuse to start over a previous run unless told to move it aside, clear crashed-save debris).

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local filesystems and on
NFSv3+ (where `flock` is not reliable), holding the owner's host, pid, process start time and
command. Stale-lock rule: a lock written on this host whose process no longer runs (or whose pid
now belongs to another process) is taken over with a one-line notice; a lock from another host
is never taken over automatically, since its process cannot be seen from here: the error names
the lock file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_train.errors import ConfigError

LOCK = ".lock"
PREVIOUS = "previous"  # where train.overwrite=true moves an earlier run
# Set by `dist-train train --nproc N` for its workers: the launcher owns the run directory.
OWNER_ENV = "DIST_TRAIN_RUN_DIR_OWNER"
# A run directory holds a run once any of these exist.
RUN_FILES = ("config.yaml", "metrics.jsonl", "checkpoints")


def _start_ticks(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, ticks: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        pass
    now = _start_ticks(pid)
    return ticks is None or now is None or now == ticks


def _describe(holder: dict[str, Any]) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {started}"


class RunLock:
    """The lock file of one run directory, held from `acquire` to `release`."""

    def __init__(self, run_dir: Path, key: str = "train.run_dir") -> None:
        self.run_dir = run_dir
        self.key = key  # the setting that named the directory, for error messages
        self.path = run_dir / LOCK
        self.created_dir = False
        self.held = False

    def _create(self, record: dict[str, Any]) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return True

    def acquire(self, say: Callable[[str], None] = print) -> None:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise ConfigError(self.key, str(self.run_dir), "is a file; expected a directory")
        self.created_dir = not self.run_dir.exists()
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            record = {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "ticks": _start_ticks(os.getpid()),
                "started": time.time(),
                "command": " ".join(sys.argv),
            }
            if self._create(record):
                self.held = True
                return
            holder = self._holder()
            if holder is None or not self._stale(holder):
                self.created_dir = False
                raise ConfigError(self.key, str(self.run_dir), self._busy(holder))
            say(
                f"taking over the stale lock of {self.run_dir} ({_describe(holder)}: "
                "no longer running)"
            )
            self.path.unlink(missing_ok=True)
            if not self._create(record):  # another run took it in between
                raise ConfigError(self.key, str(self.run_dir), self._busy(self._holder()))
            self.held = True
        except OSError as e:
            raise ConfigError(
                self.key, str(self.run_dir), f"cannot write there ({e.strerror or e})"
            ) from None

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written right now, or unreadable: treat as held

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        return not _alive(int(holder.get("pid", -1)), holder.get("ticks"))

    def _busy(self, holder: dict[str, Any] | None) -> str:
        who = _describe(holder) if holder else "another run"
        remote = holder is not None and holder.get("host") != socket.gethostname()
        hint = (
            f"; if that run is gone, delete {self.path}"
            if remote
            else f"; wait for it to finish or use another {self.key}"
        )
        return f"in use by {who} ({holder.get('command', '') if holder else ''}){hint}"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a run that failed before writing anything leaves no trace


def holds_a_run(run_dir: Path) -> list[str]:
    """The files of an earlier run in run_dir (empty when there is none)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def move_aside(run_dir: Path) -> Path:
    """Move everything of the earlier run into run_dir/previous/<timestamp>/ (nothing deleted)."""
    target = run_dir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():  # two overwrites within a second
        target = target.with_name(target.name + "_")
    target.mkdir(parents=True)
    for entry in run_dir.iterdir():
        if entry.name not in (LOCK, PREVIOUS):
            os.replace(entry, target / entry.name)
    return target


def remove_debris(run_dir: Path, say: Callable[[str], None]) -> None:
    """What a crash left among the checkpoints, by name alone (this layer reads no manifest;
    `dist_train.checkpoint.recovery` first finishes the commits it can verify): a commit cut
    between its renames is rolled back (`.old_step_N` renamed back to `step_N` when that is
    missing, else deleted), and `.tmp_step_*` (saves never committed: never resumable, only
    space) and `.del_*` (deletions under way) are removed. Says what it did in one line."""
    root = run_dir / "checkpoints"
    done = []
    for aside in sorted(root.glob(".old_step_*")):
        final = aside.with_name(aside.name[len(".old_") :])
        if final.exists():  # the commit had put its new folder in place
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, final)
            done.append(f"put back {final.name} (a crash cut the commit that was replacing it)")
    debris, deleting = sorted(root.glob(".tmp_step_*")), sorted(root.glob(".del_*"))
    for path in [*debris, *deleting]:
        shutil.rmtree(path, ignore_errors=True)
    if debris:
        done.append(
            f"removed {len(debris)} incomplete checkpoint folder(s) left by an interrupted "
            f"save: {', '.join(p.name for p in debris)}"
        )
    if deleting:
        done.append(f"finished deleting {', '.join(p.name[len('.del_') :] for p in deleting)}")
    if done:
        say("; ".join(done))


def prepare(run_dir: Path, fresh: bool, overwrite: bool, say: Callable[[str], None]) -> None:
    """The owner's duties before anything is written. `fresh`: no checkpoint will be resumed."""
    if overwrite or fresh:
        found = holds_a_run(run_dir)
        if found and not overwrite:
            raise ConfigError(
                "train.run_dir",
                str(run_dir),
                f"holds an earlier run ({', '.join(found)}) that this fresh start would mix with; "
                "use a new train.run_dir, or train.overwrite=true to move the earlier run aside "
                f"to {run_dir / PREVIOUS}/<time>/ (nothing is deleted)",
            )
        if found:
            say(
                f"train.overwrite: moved the earlier run in {run_dir} aside to "
                f"{move_aside(run_dir)}"
            )
    remove_debris(run_dir, say)


@contextmanager
def owned_run_dir(
    run_dir: Path, say: Callable[[str], None] = print, key: str = "train.run_dir"
) -> Iterator[RunLock]:
    """Hold the run directory's lock for the duration; released on every exit path."""
    lock = RunLock(run_dir, key)
    lock.acquire(say)
    try:
        yield lock
    finally:
        lock.release()
