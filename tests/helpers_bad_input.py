"""The table of bad input around an existing run (export, resume, ownership): each case's
damage to a copy of a trained run, the command's words, and the start of its one-line error.
test_bad_input_run.py runs it; test_bad_input.py checks that the README counts its rows."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from helpers import TINY_RUN

# The training words of every bad-input case: the tiny run, two steps.
TINY = [*TINY_RUN, "model.block_size=32", "train.max_steps=2"]


def _shard(run: Path) -> Path:
    return next((run / "checkpoints/step_0000004").glob("*.distcp"))


def _truncate(run: Path) -> None:
    shard = _shard(run)
    shard.write_bytes(shard.read_bytes()[:-100])


def _flip(run: Path) -> None:
    data = bytearray(_shard(run).read_bytes())
    data[len(data) // 2] ^= 0xFF
    _shard(run).write_bytes(bytes(data))


def _hold_lock(run: Path) -> None:  # a live process on this host: this test's own
    import json
    import os
    import socket

    (run / ".lock").write_text(
        json.dumps(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": 0, "command": "pytest"}
        )
    )


def _no_checkpoint(run: Path) -> None:  # a run that crashed before its first commit
    import shutil

    shutil.rmtree(run / "checkpoints")


RUN_CASES: list[tuple[str, Callable[[Path], None], list[str], str]] = [
    ("export to a directory", lambda run: None, ["export", "{run}", "--out", "{run}"], "--out="),
    (
        "export in an unknown dtype",
        lambda run: None,
        ["export", "{run}", "--out", "{tmp}/m.safetensors", "--dtype", "int8"],
        "--dtype='int8'",
    ),
    (
        "export of an export",
        lambda run: (run / "m.safetensors").write_bytes(b""),
        ["export", "{run}/m.safetensors", "--out", "{tmp}/m.safetensors"],
        "checkpoint=",
    ),
    (
        "export of a truncated shard",
        _truncate,
        ["export", "{run}", "--out", "{tmp}/m.safetensors"],
        "checkpoint=",
    ),
    (
        "resume from a truncated shard",
        _truncate,
        ["train", "{cfg}", "train.max_steps=6"],
        "resume=",
    ),
    ("resume from a corrupted shard", _flip, ["train", "{cfg}", "train.max_steps=6"], "resume="),
    (
        "newest checkpoint damaged",
        lambda run: (run / "checkpoints/step_0000004/.metadata").unlink(),
        ["train", "{cfg}", "train.max_steps=6"],
        "resume='auto'",
    ),
    (
        "fresh start over an earlier run",
        lambda run: None,
        ["train", "{cfg}", "resume=none"],
        "train.run_dir=",
    ),
    ("run directory in use", _hold_lock, ["train", "{cfg}", "train.max_steps=6"], "train.run_dir="),
    (
        "incompatible resume",
        lambda run: None,
        ["train", "{cfg}", "train.max_steps=6", "model.n_layer=3", "--nproc", "2"],
        "resume=",
    ),
    (
        "bad metric with train.overwrite",
        lambda run: None,
        ["train", "{cfg}", "train.overwrite=true", "train.metrics=[builtins.object]"],
        "train.metrics=",
    ),
    (
        "another run without a checkpoint",
        _no_checkpoint,
        ["train", "{cfg}", "model.n_layer=3"],
        "train.run_dir=",
    ),
]
