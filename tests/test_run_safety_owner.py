"""Work is never lost around a healthy run: one owner per run directory (a lock naming its
holder, stale and foreign locks), no silent fresh start over an earlier run, and the owner's
clean-up of an interrupted save's debris."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dist_train.checkpoint.files import complete_checkpoints
from dist_train.errors import ConfigError
from dist_train.launch.rundir import LOCK

from conftest import CLI, cli
from helpers_run_safety import QUICK, one_line, records, snapshot


@pytest.mark.slow
def test_fresh_start_over_an_earlier_run_is_refused_and_overwrite_moves_it_aside(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    assert cli("train", *QUICK, f"train.run_dir={run}").returncode == 0
    before = snapshot(run)
    line = one_line(cli("train", *QUICK, f"train.run_dir={run}", "resume=none"), "earlier run")
    assert "train.overwrite=true" in line and snapshot(run) == before  # nothing touched
    proc = cli("train", *QUICK, f"train.run_dir={run}", "train.overwrite=true", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "moved the earlier run" in proc.stdout
    (aside,) = (run / "previous").iterdir()
    assert [r["step"] for r in records(aside) if "loss" in r] == list(range(1, 11))
    assert [p.name for p in complete_checkpoints(aside / "checkpoints")] == ["step_0000010"]
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_0000004"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(
        [
            str(CLI),
            "train",
            *QUICK,
            f"train.run_dir={run_dir}",
            "train.max_steps=100000",
            "checkpoint.every_steps=5",
            *extra,
        ],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_second_run_into_a_busy_run_directory_exits_2_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "busy"
    first = start(run)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        for extra in ([], ["--nproc", "2"], ["resume=none"]):
            line = one_line(cli("train", *QUICK, f"train.run_dir={run}", *extra), "in use by")
            assert f"pid {first.pid} on host {socket.gethostname()}" in line
    finally:
        first.terminate()
        first.communicate(timeout=60)
    steps = [r["step"] for r in records(run) if "loss" in r]  # every line is whole JSON
    assert steps == list(range(1, len(steps) + 1))  # one run's records, nobody else's
    assert not (run / LOCK).exists()  # released on SIGTERM too


def test_stale_and_foreign_locks(tmp_path: Path) -> None:
    from dist_train.launch.rundir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / LOCK).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0, "command": "old"})
    )
    said: list[str] = []
    lock = RunLock(run)
    lock.acquire(said.append)  # the holder is gone: taken over, with a word
    assert "stale lock" in said[0] and json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK).exists() and run.is_dir()  # a directory it did not create stays
    (run / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(ConfigError, match=f"if that run is gone, delete {run / LOCK}"):
        RunLock(run).acquire(said.append)
    fresh = RunLock(tmp_path / "new")
    fresh.acquire()
    fresh.release()
    assert not (tmp_path / "new").exists()  # failed before writing anything: no trace


@pytest.mark.slow
def test_owner_removes_interrupted_save_debris(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("train", *QUICK, f"train.run_dir={run}", "train.max_steps=4").returncode == 0
    debris = run / "checkpoints/.tmp_step_0000099"
    debris.mkdir()
    (debris / "__0_0.distcp").write_bytes(b"x" * 1000)
    proc = cli("train", *QUICK, f"train.run_dir={run}", "train.max_steps=6")
    assert proc.returncode == 0 and "removed 1 incomplete checkpoint folder" in proc.stdout
    assert not debris.exists()
