"""The output directory of `dist-train prepare`, written atomically: every file goes to a
staging folder inside it first and is moved into place only once all of them are complete, so
a failed or interrupted prepare leaves no half-written train.bin that a later run would read."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_train.data.tokenizer import TOKENIZER_FILE
from dist_train.errors import ConfigError

FORMAT, VERSION, META = "dist_train.tokens", 1, "meta.json"
OUTPUTS = ("train.bin", "val.bin", TOKENIZER_FILE, META)  # meta.json last: it marks completion
STAGING = ".prepare-"  # + pid: a prepare in progress (or one that was killed)


def read_meta(path: Path) -> dict[str, Any] | None:
    """meta.json of a prepared directory, or None when there is none that we wrote."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None


class OutputDir:
    """OUT may be new, empty, or an earlier prepare's output (replaced once the new one is
    complete); anything else is refused, so no user file is ever overwritten."""

    def __init__(self, path: Path, log: Callable[[str], None]) -> None:
        self.path = path
        previous = _check(path)
        if previous is not None:
            log(f"{path}: {previous} will be replaced once this run completes")
        for stale in _leftovers(path):
            log(f"{path}: removing {stale.name}, left by a prepare that was killed")
            shutil.rmtree(stale, ignore_errors=True)
        self.created: list[Path] = []  # folders made here, removed again on failure
        self.staging = path / f"{STAGING}{os.getpid()}"
        try:
            missing = path
            while not missing.exists():
                self.created.append(missing)
                missing = missing.parent
            self.staging.mkdir(parents=True)
        except OSError as e:
            self.abort()
            raise ConfigError("--out", str(path), f"cannot write there ({e.strerror})") from None

    def file(self, name: str) -> Path:
        return self.staging / name

    def commit(self, meta: dict[str, Any]) -> None:
        _write_synced(self.file(META), json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
        # The old meta.json goes first: from then on the folder no longer claims to be a
        # complete dataset until the new one lands (the renames take microseconds).
        (self.path / META).unlink(missing_ok=True)
        for name in OUTPUTS:
            if self.file(name).exists():
                os.replace(self.file(name), self.path / name)
            else:  # e.g. a val.bin of the earlier data, which this one has not
                (self.path / name).unlink(missing_ok=True)
        self.staging.rmdir()
        _sync_dir(self.path)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for folder in self.created:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break


def _check(path: Path) -> str | None:
    """What an earlier prepare left there (to be replaced), None for a new or empty folder."""
    if path.exists() and not path.is_dir():
        raise ConfigError("--out", str(path), "is a file; give a new or empty directory")
    entries = sorted(path.iterdir()) if path.is_dir() else []
    names = [p.name for p in entries if not p.name.startswith(STAGING)]
    if not names:
        return None
    previous = read_meta(path)
    interrupted = previous is None and len(names) < len(entries)  # killed amid its renames
    if not set(names) <= set(OUTPUTS) or not (previous or interrupted):
        shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        raise ConfigError(
            "--out",
            str(path),
            f"holds {shown}, which dist-train prepare did not write; give a new or empty "
            "directory (or an earlier prepare's output, which is replaced)",
        )
    if previous is None:
        return "the files of an interrupted prepare"
    return f"the data prepared there earlier ({previous.get('train_tokens', '?')} train tokens)"


def _leftovers(path: Path) -> list[Path]:
    """Staging folders of prepares no longer running (a kill -9 skips all cleanup)."""
    found = []
    for entry in path.glob(f"{STAGING}*") if path.is_dir() else []:
        try:
            os.kill(int(entry.name[len(STAGING) :]), 0)
        except ProcessLookupError:
            found.append(entry)
        except (ValueError, OSError):  # not our name, or a live process of another user
            pass
    return found


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the renames themselves survive a crash
    finally:
        os.close(fd)
