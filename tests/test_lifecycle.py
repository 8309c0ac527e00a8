"""The run directory's lifecycle (dist_train/train/lifecycle.py, README "Run lifecycle"): from
every state an earlier run left, the same command does the one documented thing. A crash
before the first checkpoint restarts (its records set aside), another run's directory is
refused, resuming an older checkpoint sets the newer lineage aside, a rerun that trains
nothing writes nothing, and a lock file that cannot be read does not wedge the directory."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.errors import ConfigError
from dist_train.launch.rundir import LOCK, UNREADABLE_STALE_S, RunLock

from conftest import REPO, TESTS, cli
from helpers import StopTraining
from helpers_run_safety import QUICK, one_line, records, snapshot


def crash_during(monkeypatch: pytest.MonkeyPatch, step: int, *command: str) -> None:
    """`dist-train COMMAND` in this process, dying during `step` (a kill -9 at that moment:
    nothing of the step is logged or saved)."""
    from dist_train.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self: Trainer, s: int, measure_norm: bool) -> Any:
        if s + 1 == step:
            raise StopTraining
        return original(self, s, measure_norm)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_step", train_step)
        with pytest.raises(StopTraining):
            cli(*command)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def leave_stale_lock(run: Path) -> None:
    """What a kill -9 leaves besides the records: the lock of a process that is gone."""
    holder = {"host": socket.gethostname(), "pid": dead_pid(), "started": 0, "command": "x"}
    (run / LOCK).write_text(json.dumps(holder))


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run_dir) if "loss" in r}


# --- a crash before the first checkpoint ------------------------------------------------------


def test_a_crash_before_the_first_checkpoint_restarts_with_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    command = ["train", *QUICK, f"train.run_dir={run}"]
    crash_during(monkeypatch, 4, *command)
    leave_stale_lock(run)
    debris = run / "checkpoints/.tmp_step_0000010"  # and a first save that was cut short
    debris.mkdir(parents=True)
    (debris / "__0_0.distcp").write_bytes(b"x" * 100)
    crashed = losses(run)
    assert sorted(crashed) == [1, 2, 3] and not complete_checkpoints(run / "checkpoints")

    proc = cli(*command)
    assert proc.returncode == 0, proc.stderr
    assert "stopped before its first checkpoint" in proc.stdout
    (aside,) = (run / "previous").iterdir()
    assert f"aside to {aside}" in proc.stdout
    assert losses(aside) == crashed  # the attempt's records, kept whole
    assert (aside / "config.yaml").is_file()
    again = losses(run)
    assert sorted(again) == list(range(1, 11))  # one run's records, from step 1
    assert {s: again[s] for s in crashed} == crashed  # a clean restart: the same steps again
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_0000010"]
    assert not (run / LOCK).exists()


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Plain torchrun with 2 workers: rank 0 owns the run directory, not a launcher of ours."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        env.pop(var, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "dist_train", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["--nproc 2", "torchrun"])
def test_two_workers_restart_a_run_that_crashed_before_its_first_checkpoint(
    launcher: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    command = ["train", *QUICK, f"train.run_dir={run}"]
    crash_during(monkeypatch, 3, *command)
    crashed = losses(run)
    plain = launcher == "torchrun"
    proc = torchrun(command, tmp_path) if plain else cli(*command, "--nproc", "2")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.count("stopped before its first checkpoint") == 1  # said once
    (aside,) = (run / "previous").iterdir()
    assert losses(aside) == crashed
    assert sorted(losses(run)) == list(range(1, 11))


def test_an_earlier_run_is_told_apart_by_the_settings_a_resume_may_not_change(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    command = ["train", *QUICK, f"train.run_dir={run}"]
    crash_during(monkeypatch, 3, *command)
    before = snapshot(run)
    line = one_line(cli(*command, "model.n_layer=3"), "other settings")
    assert "model.n_layer (2 -> 3)" in line and "train.overwrite=true" in line
    assert snapshot(run) == before  # refused before anything moved
    (run / "config.yaml").rename(tmp_path / "config.yaml")
    one_line(cli(*command), "config.yaml is missing or unreadable")
    (tmp_path / "config.yaml").rename(run / "config.yaml")
    # The learning rate may change on a resume, so it does not make another run.
    proc = cli(*command, "optim.lr=2e-3")
    assert proc.returncode == 0 and "stopped before its first checkpoint" in proc.stdout


# --- one lineage ------------------------------------------------------------------------------


def test_resuming_an_older_checkpoint_sets_the_newer_lineage_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    command = [
        "train",
        *QUICK,
        f"train.run_dir={run}",
        "train.max_steps=30",
        "checkpoint.every_steps=10",
        "checkpoint.keep_last=3",
        "checkpoint.best.metric=''",  # step folders alone (best follows them: test_selection)
    ]
    assert cli(*command).returncode == 0
    old = {s: read_manifest(run / f"checkpoints/step_{s:07d}")["config"] for s in (20, 30)}
    old_records = records(run)
    step10 = run / "checkpoints/step_0000010"
    # a new lineage from step 10, killed during step 25
    crash_during(monkeypatch, 25, *command, f"resume={step10}", "optim.lr=5e-4")
    (aside,) = (run / "previous").iterdir()
    moved = sorted(p.name for p in (aside / "checkpoints").iterdir())
    assert moved == ["step_0000020", "step_0000030"]  # the old lineage, whole
    for s, config in old.items():
        assert read_manifest(aside / f"checkpoints/step_{s:07d}")["config"] == config
    assert records(aside) == [r for r in old_records if r["step"] > 10]

    proc = cli(*command, "optim.lr=5e-4")  # what a requeue runs: resume=auto
    assert proc.returncode == 0, proc.stderr
    assert f"resumed from {run / 'checkpoints/step_0000020'} at step 20" in proc.stdout
    assert [r["step"] for r in records(run) if "loss" in r] == list(range(1, 31))
    assert all(r["lr"] <= 5e-4 for r in records(run) if "lr" in r and r["step"] > 10)
    newest = complete_checkpoints(run / "checkpoints")[-1]
    assert read_manifest(newest)["config"]["optim"]["lr"] == 5e-4
    # Nothing lost: every record is in this lineage, the one set aside, or the rolled-back ones.
    kept = records(run) + records(aside) + records(run, "metrics.discarded.jsonl")
    assert all(r in kept for r in old_records)


# --- a rerun that trains nothing --------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="finished"),
        pytest.param(["checkpoint.enabled=false"], id="no checkpoints"),
    ],
)
def test_a_rerun_that_trains_nothing_writes_nothing(tmp_path: Path, extra: list[str]) -> None:
    run = tmp_path / "run"
    command = ["train", *QUICK, f"train.run_dir={run}", "train.max_steps=4", *extra]
    assert cli(*command).returncode == 0
    config = (run / "config.yaml").read_text()
    before = snapshot(run)
    proc = cli(*command, "optim.lr=5e-4")  # other settings that a resume could change
    assert proc.returncode == 0 and "done already" in proc.stdout, proc.stdout + proc.stderr
    assert snapshot(run) == before and (run / "config.yaml").read_text() == config


# --- locks ------------------------------------------------------------------------------------


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_an_unreadable_lock_is_stale_once_old_and_waited_for_while_young(tmp_path: Path) -> None:
    lock_file = tmp_path / LOCK
    said: list[str] = []
    for content in ("", '{"pid": 12'):  # killed between create and write; cut short
        lock_file.write_text(content)
        age(lock_file, UNREADABLE_STALE_S + 1)
        lock = RunLock(tmp_path)
        lock.acquire(said.append, wait=lambda _: pytest.fail("an old lock is not waited for"))
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        assert f"taking over the unreadable lock {lock_file}" in said.pop()
        lock.release()

    def written_meanwhile(_: float) -> None:  # its writer finishes while we wait
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": 0}
        lock_file.write_text(json.dumps(holder))

    lock_file.write_text("")
    with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}.*lock file {lock_file}"):
        RunLock(tmp_path).acquire(said.append, wait=written_meanwhile)
    waits: list[float] = []

    def nobody_writes(seconds: float) -> None:  # time passes; the file stays empty
        waits.append(seconds)
        age(lock_file, UNREADABLE_STALE_S + 1)

    lock_file.write_text("")
    lock = RunLock(tmp_path)
    lock.acquire(said.append, wait=nobody_writes)
    assert len(waits) == 1 and "unreadable lock" in said.pop()
    lock.release()
    lock_file.write_text("")
    age(lock_file, -60)  # written by a host whose clock runs a minute ahead of ours
    waits.clear()
    lock = RunLock(tmp_path)
    lock.acquire(said.append, wait=waits.append)  # stale once watched that long, unread
    assert sum(waits) == pytest.approx(UNREADABLE_STALE_S) and "unreadable lock" in said.pop()
    lock.release()
    assert not said


def test_a_lock_that_cannot_be_written_is_not_left_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dist_train.launch.rundir as rundir

    def full(*_: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.json, "dump", full)
    with pytest.raises(ConfigError, match=r"cannot write there.*No space left"):
        RunLock(tmp_path).acquire()
    assert not (tmp_path / LOCK).exists()  # the next run is not wedged by an empty lock


def test_an_empty_lock_left_by_a_kill_does_not_wedge_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / LOCK).write_text("")
    age(run / LOCK, UNREADABLE_STALE_S + 1)
    proc = cli("train", *QUICK, f"train.run_dir={run}", "train.max_steps=2")
    assert proc.returncode == 0, proc.stderr
    assert f"taking over the unreadable lock {run / LOCK}" in proc.stdout
    assert not (run / LOCK).exists()


def test_the_readme_tables_every_state() -> None:
    from dist_train.train import lifecycle

    readme = (REPO / "README.md").read_text()
    table = readme.split("## Run lifecycle", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    states = [lifecycle.FRESH, lifecycle.STOPPED, lifecycle.CRASHED, lifecycle.FINISHED]
    for state in [*states, lifecycle.STOPPED_EARLY, "running", "another run"]:
        assert any(row.startswith(state) for row in rows), state
