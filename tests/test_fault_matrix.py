"""The fault matrix (issue 20): a run killed (kill -9) or stopped (SIGTERM) at each point of its
life, then started again with the same command, finishes with bitwise the final weights and
losses of a run never interrupted, metrics.jsonl holds one record per logged and evaluated step
of one lineage, and every record of the attempt cut short is kept (moved aside is fine). The
faults strike where DIST_TRAIN_FAULT says (dist_train/launch/faults.py), not after a sleep.

Size: 1 process, 12 points x 2 modes, each a fresh run and its rerun (forked from the test
process: no interpreter start-up); 2 workers (`--nproc 2`), the 11 points x 2 modes in 21 faults
along three chains of reruns (kill -9 at each point; SIGTERM or SIGUSR1 at each, its
forward/backward one before the first commit), 25 launches in all with the baseline."""

from __future__ import annotations

import fcntl
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.launch.faults import FAULT_ENV, Fault, fault_for, parse_fault, progress_for
from dist_train.launch.watch import Progress

from conftest import cli
from helpers_fault_matrix import (
    RUN,
    STEPS,
    baseline_of,
    check_finished,
    record_lines,
    run_forked,
)

# A stop signal during the evaluation at step 8 is acted on inside it: saved at step 8, with the
# evaluation still owed (the resumed run does it first).
EVALUATION_STOP = 8

# Two workers: each attempt of a chain is the same command again, continuing what the previous
# attempt's fault left; after the last fault it must finish. Every point appears at least once,
# in the mode that tells most with two workers: rank 1 killed is a peer lost (commit and
# retention are rank 0's alone); a SIGTERM goes to the launcher, which forwards it to both
# workers. One chain saves synchronously, the other in the background. Each fault, and the
# step the next attempt resumes from (0: starts over; 12: the run is done already).
CHAINS = {
    "sync-saves": (
        [],
        [
            ("start-up@1:rank1", 0),
            ("forward/backward@3", 0),  # before the first commit
            ("data@6:rank1", 4),
            ("sync-save@8:rank1", 4),  # a peer lost during the save
            ("commit@8", 8),
            ("retention@12", 12),
        ],
    ),
    "async-saves": (
        ["checkpoint.async_save=true"],
        [
            ("start-up@1:TERM", 0),  # before the loop: stops at once, nothing to save
            ("forward/backward@2:TERM:rank1", 2),  # the first checkpoint is the stop's
            ("optimizer@3:TERM", 3),
            ("async-save@4:TERM:rank1", 5),  # the stop finishes the background save first
            ("log@6:USR1", 6),  # SLURM's warning ahead of a time limit, as SIGTERM
            ("async-save@8:rank1", 6),  # a peer lost during a background save
            ("evaluation@8:TERM:rank1", EVALUATION_STOP),
        ],
    ),
    # The points and modes the two chains above leave out, with a checkpoint every 2 steps so
    # that each attempt has a commit to strike.
    "sync-saves-every-2": (
        ["checkpoint.every_steps=2"],
        [
            ("data@3:TERM", 3),
            ("optimizer@5:rank1", 4),
            ("forward/backward@6", 4),  # after the first commit
            ("retention@6:TERM", 7),
            ("log@8", 7),  # a step's log comes before its checkpoint
            ("evaluation@8:rank1", 7),  # and so does its evaluation
            ("sync-save@8:TERM", 9),
            ("commit@10:TERM", 11),
        ],
    ),
}


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run under `--nproc 2`, trained once for all xdist workers (the first to
    get here trains it, the others read it)."""
    root = tmp_path_factory.getbasetemp()
    shared = (root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root) / "two_workers"
    shared.mkdir(exist_ok=True)
    with open(shared / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (shared / "baseline.pt").exists():
            status, out = run_forked([*RUN, "--nproc", "2"], shared / "run")
            assert status == 0, out[-3000:]
            torch.save(baseline_of(shared / "run"), shared / "baseline.pt")
    return torch.load(shared / "baseline.pt")


def run_chain(chain: str, baseline: dict[str, Any], run: Path) -> None:
    extra, faults = CHAINS[chain]
    args = [*RUN, *extra, "--nproc", "2"]
    kept, previous = set[str](), None
    for fault, resumes in [*faults, (None, None)]:
        status, out = run_forked(args, run, fault)
        if previous is not None:  # this attempt continues what the previous fault left
            check_continued(out, run, previous[1], f"after {previous[0]}")
        stop = fault is not None and (":TERM" in fault or ":USR1" in fault)
        expected = 0 if fault is None else 143 if stop else 138
        assert status == expected, f"{fault}: {out[-3000:]}"
        if stop and fault.startswith("start-up@"):  # type: ignore[union-attr]
            # Nothing trained yet, so nothing saved: no line may say otherwise.
            assert "terminated (SIGTERM) before training" in out, out[-3000:]
            assert " saved " not in out and "and saved" not in out, out[-3000:]
        elif fault is not None and not stop:  # the launcher names the worker killed, not a peer
            rank = fault.rsplit(":rank", 1)[1] if ":rank" in fault else "0"
            said = f"error: worker rank {rank} was killed by SIGKILL"
            assert said in out and "exit status 138 (a retry can fix it)" in out, out[-3000:]
        elif stop:  # rank 0 says where it saved: where the next attempt resumes
            steps = resumes if isinstance(resumes, tuple) else (resumes,)
            said = [f"saved {run}/checkpoints/step_{s:07d};" for s in steps]
            assert "preempted (SIG" in out and any(x in out for x in said), out[-3000:]
        kept |= record_lines(run)
        previous = (fault, resumes)
    check_finished(run, baseline, kept)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("chain", CHAINS)
def test_two_workers_continue_from_each_fault_of_a_chain(
    chain: str, two_workers: dict[str, Any], tmp_path: Path
) -> None:
    run_chain(chain, two_workers, tmp_path / "run")


# Each point at a step of the 12-step run (evaluations and checkpoints at 4, 8, 12), and the
# step the same command then resumes from (0: starts over), after kill -9 and after SIGTERM. A
# SIGTERM is acted on at the next log step (every step here): after a save, at the next step.
ONE_PROCESS = {
    "start-up": ("start-up@1", 0, 0),  # SIGTERM: "terminated before training", exit 143
    "before-first-commit": ("forward/backward@3", 0, 3),
    "data": ("data@6", 4, 6),
    "forward/backward": ("forward/backward@6", 4, 6),
    "optimizer": ("optimizer@6", 4, 6),
    "log": ("log@6", 4, 6),
    "log-at-evaluation-step": ("log@8", 4, 8),
    "evaluation": ("evaluation@8", 4, EVALUATION_STOP),
    "sync-save": ("sync-save@8", 4, 9),
    "async-save": ("async-save@8", 4, 9),  # the write under way in the background
    "commit": ("commit@8", 8, 9),  # start-up recovery finishes the verified commit
    "retention": ("retention@8", 8, 9),
}
MODES = {"kill-9": ("", -9), "SIGTERM": (":TERM", 143)}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    run = tmp_path_factory.mktemp("baseline") / "run"
    status, out = run_forked(RUN, run)
    assert status == 0, out[-3000:]
    return baseline_of(run)


@pytest.mark.parametrize(
    ("point", "mode"),
    [pytest.param(p, m, id=f"{p}-{m}") for p in ONE_PROCESS for m in MODES],
)
def test_one_process_continues_from_a_fault_at_every_point(
    point: str, mode: str, one_process: dict[str, Any], tmp_path: Path
) -> None:
    fault, *resumes = ONE_PROCESS[point]
    suffix, expected = MODES[mode]
    args = [*RUN, *(["checkpoint.async_save=true"] if point == "async-save" else [])]
    run = tmp_path / "run"
    status, out = run_forked(args, run, fault + suffix)
    assert status == expected, out[-3000:]
    kept = record_lines(run)
    status, out = run_forked(args, run)  # the same command
    assert status == 0, out[-3000:]
    check_continued(out, run, resumes[list(MODES).index(mode)])
    check_finished(run, one_process, kept)


def check_continued(
    out: str, run: Path, step: int | tuple[int, ...], after: str = "after the fault"
) -> None:
    """The same command resumed from checkpoint `step` (or one of them), started over (0), or
    found the run done (the last step)."""
    if step == 0:
        assert "resumed from" not in out and "done already" not in out, f"{after}: {out[-3000:]}"
    elif step == STEPS:
        assert "done already" in out, f"{after}: {out[-3000:]}"
    else:
        steps = step if isinstance(step, tuple) else (step,)
        lines = [f"resumed from {run}/checkpoints/step_{s:07d} " for s in steps]
        assert any(line in out for line in lines), f"{after}: {out[-3000:]}"


# --- the hook itself ---------------------------------------------------------------------------


def test_the_fault_variable_names_point_step_signal_and_rank() -> None:
    assert parse_fault(None) is None and parse_fault("") is None
    assert parse_fault("commit@8") == Fault("commit", 8, signal.SIGKILL, 0)
    assert parse_fault("forward/backward@6:TERM:rank1") == Fault(
        "forward/backward", 6, signal.SIGTERM, 1
    )
    assert parse_fault("start-up@1:sigusr1").signum == signal.SIGUSR1  # type: ignore[union-attr]


@pytest.mark.parametrize("value", ["evaluation", "eval@8", "data@x", "data@3:HUP", "log@2:rank"])
def test_a_malformed_fault_is_one_line_before_anything_is_written(
    value: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    proc = cli(*RUN, f"train.run_dir={run}", env={FAULT_ENV: value})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith(f"error: {FAULT_ENV}={value!r}: ")
    assert not run.exists()


def test_without_a_fault_nothing_checks_for_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plain Progress, whose enter the loop calls every micro-step, is what a run gets."""
    monkeypatch.delenv(FAULT_ENV, raising=False)
    assert fault_for(0) is None and type(progress_for(None)) is Progress
    monkeypatch.setenv(FAULT_ENV, "data@3:rank1")
    assert fault_for(0) is None  # another rank's
    assert fault_for(1) == Fault("data", 3, signal.SIGKILL, 1)


def test_a_fault_strikes_once_at_its_point_and_step() -> None:
    got: list[int] = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, _: got.append(signum))
    try:
        progress = progress_for(Fault("data", 3, signal.SIGUSR1))
        progress.enter("data", 1)  # Progress counts from 0: step 2
        progress.enter("forward/backward", 2)  # step 3, another point
        assert got == []
        progress.enter("data", 2)
        progress.enter("data", 2, micro=1)  # the next micro-batch: struck already
        assert got == [signal.SIGUSR1]
        assert progress.at[:3] == (2, 1, "data")  # and still reports where it is
    finally:
        signal.signal(signal.SIGUSR1, previous)
