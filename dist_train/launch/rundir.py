"""One owner per run directory: an exclusive-create lock file, and the moves its owner makes
(an earlier run or lineage set aside under previous/, crashed-save debris cleared). What the
owner decides to move is `dist_train.train.lifecycle`'s job.

The lock is a file created with O_CREAT | O_EXCL, which is atomic on local filesystems and on
NFSv3+ (where `flock` is not reliable), holding the owner's host, pid, process start time and
command. Stale-lock rule: a lock written on this host whose process no longer runs (or whose pid
now belongs to another process) is taken over with a one-line notice; so is a lock file that
cannot be read (empty: its writer died between creating and writing it, or the disk was full)
once it is UNREADABLE_STALE_S old, while a younger one is re-read (it may be being written). A
lock from another host is never taken over automatically, since its process cannot be seen
from here: the error names the lock file to delete once that run is known to be gone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dist_train.errors import ConfigError

LOCK = ".lock"
PREVIOUS = "previous"  # where an earlier run, or an abandoned lineage, is moved aside
# A lock file is written within microseconds of its creation: one still unreadable after this
# many seconds (by its mtime) was left by a writer that died, and is stale.
UNREADABLE_STALE_S = 5.0
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
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
        except OSError:  # a full disk: leave no empty lock behind to wedge the next run
            self.path.unlink(missing_ok=True)
            raise
        return True

    def acquire(
        self, say: Callable[[str], None] = print, wait: Callable[[float], None] = time.sleep
    ) -> None:
        """Take the lock, or raise ConfigError naming its holder and the lock file. `wait`
        sleeps while an unreadable lock is young enough to be being written."""
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
            self.held = self._take(record, say, wait)
        except OSError as e:
            raise ConfigError(
                self.key, str(self.run_dir), f"cannot write there ({e.strerror or e})"
            ) from None

    def _take(
        self, record: dict[str, Any], say: Callable[[str], None], wait: Callable[[float], None]
    ) -> bool:
        for _ in range(3):  # the holder may release it between our two looks
            if self._create(record):
                return True
            found, holder = self._settled_holder(wait)
            if not found:
                continue
            if holder is None:
                say(
                    f"taking over the unreadable lock {self.path} (untouched for "
                    f"{UNREADABLE_STALE_S:g}+ s: its writer died before finishing it)"
                )
            elif self._stale(holder):
                say(
                    f"taking over the stale lock {self.path} ({_describe(holder)}: no longer running)"
                )
            else:
                raise ConfigError(self.key, str(self.run_dir), self._busy(holder))
            self.path.unlink(missing_ok=True)
            if self._create(record):
                return True
        raise ConfigError(self.key, str(self.run_dir), self._busy(self._holder()))

    def _settled_holder(self, wait: Callable[[float], None]) -> tuple[bool, dict[str, Any] | None]:
        """(whether the lock file still exists, its record): an unreadable file is re-read
        until it is UNREADABLE_STALE_S old by its mtime (or has stayed unreadable that long
        while we watched: another host's clock may be ahead), then reported as None (stale)."""
        waited = 0.0
        while True:
            holder = self._holder()
            if holder is not None:
                return True, holder
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return False, None
            if max(age, waited) >= UNREADABLE_STALE_S:
                return True, None
            pause = min(0.25, UNREADABLE_STALE_S - max(age, waited))
            wait(pause)
            waited += pause

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # being written right now, or unreadable
        ours = isinstance(holder, dict) and "host" in holder and "pid" in holder
        return holder if ours else None  # not a record of ours: as unreadable

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        try:
            pid = int(holder.get("pid", -1))
        except (TypeError, ValueError):
            return True  # not a record we wrote: nobody can be holding it
        return not _alive(pid, holder.get("ticks"))

    def _busy(self, holder: dict[str, Any] | None) -> str:
        who = _describe(holder) if holder else "another run"
        command = f" ({holder.get('command', '')})" if holder and holder.get("command") else ""
        remote = holder is not None and holder.get("host") != socket.gethostname()
        hint = (
            f"if that run is gone, delete {self.path}"
            if remote
            else f"wait for it to finish or use another {self.key} (lock file {self.path})"
        )
        return f"in use by {who}{command}; {hint}"

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
        if self.created_dir and self.run_dir.is_dir() and not any(self.run_dir.iterdir()):
            self.run_dir.rmdir()  # a run that failed before writing anything leaves no trace


def holds_a_run(run_dir: Path) -> list[str]:
    """The files of an earlier run in run_dir (empty when there is none)."""
    return [name for name in RUN_FILES if (run_dir / name).exists()]


def move_aside(run_dir: Path, entries: Sequence[Path] | None = None) -> Path:
    """Move `entries` (paths inside run_dir; default: everything but the lock and previous/)
    to the same places under run_dir/previous/<timestamp>/, which is returned. Renames within
    one filesystem: nothing is copied, nothing deleted."""
    target = run_dir / PREVIOUS / time.strftime("%Y%m%d-%H%M%S")
    while target.exists():  # two set-asides within a second
        target = target.with_name(target.name + "_")
    target.mkdir(parents=True)
    if entries is None:
        entries = [e for e in run_dir.iterdir() if e.name not in (LOCK, PREVIOUS)]
    for entry in entries:
        dest = target / entry.relative_to(run_dir)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry, dest)
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
