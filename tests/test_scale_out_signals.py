"""Preemption and process death, with real processes and signals: a stop signal saves at the
step reached and a resume is bitwise, the exit status during start-up or without checkpoints,
workers stop with their launcher, one rank's signal stops every rank at the same step, a killed
worker restarts the group, and a job-wide signal spares the loading workers."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import leftover_processes, wait_for_metrics
from helpers_scale_out import RUN, losses, popen, start, stop_with


# Two workers stopped by SIGTERM and SIGUSR1 at each point of a step, with synchronous and
# background saves, resuming bitwise: the fault matrix (test_fault_matrix.py). Here: a real
# signal from outside to a real process, at whatever step it lands.
@pytest.mark.slow
def test_stop_signal_saves_at_the_step_reached(tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    nproc, signum = 1, signal.SIGTERM
    args = ["--nproc", str(nproc)]
    err, seconds = stop_with(start(cut, *args), cut, signum)
    last = err.strip().splitlines()
    line = next(x for x in last if x.startswith("preempted ("))
    assert line.startswith(f"preempted ({signal.Signals(signum).name}) at step "), err[-2000:]
    step = int(line.split(" at step ")[1].split(":")[0])
    assert f"saved {cut}/checkpoints/step_{step:07d}" in line
    assert (cut / "checkpoints" / f"step_{step:07d}").is_dir()
    assert max(losses(cut)) == step  # the partial log interval is written, nothing past it
    assert "Traceback" not in err
    print(f"{nproc} worker(s), {signal.Signals(signum).name}: exit {seconds:.2f} s after it")


def test_exit_status_of_a_stop_signal_during_start_up(tmp_path: Path) -> None:
    """The documented status, also for a signal before the first step (nothing to save)."""
    run_dir = tmp_path / "early"
    proc = popen(
        "train",
        "configs/mlp_synthetic.yaml",
        "data._target_=user_plugins.SlowToBuild",
        "model._target_=user_plugins.TinyRegressor",
        "model.kwargs.in_features=8",
        f"train.run_dir={run_dir}",
        cwd=tmp_path,
    )
    time.sleep(2.5)  # building the dataset (5 s): nothing to save yet
    os.kill(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == ["terminated (SIGTERM) before training"]
    assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_a_stop_signal_without_checkpoints_is_not_a_requeue(tmp_path: Path) -> None:
    """checkpoint.enabled=false: nothing to resume from, so not status 143 ("requeue me")."""
    run_dir = tmp_path / "unsaved"
    proc = start(run_dir, "checkpoint.enabled=false")
    err, _ = stop_with(proc, run_dir, signal.SIGTERM)
    assert proc.returncode == 1, err[-2000:]
    assert "nothing saved (checkpoint.enabled=false; exit status 1)" in err
    assert "Traceback" not in err


@pytest.mark.slow
def test_workers_stop_when_the_launcher_is_killed(tmp_path: Path) -> None:
    run_dir = tmp_path / "orphans"
    proc = start(run_dir, "--nproc", "2")
    try:
        wait_for_metrics(run_dir, proc)
        assert len(leftover_processes(str(run_dir))) == 3  # the launcher and two workers
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        sent = time.monotonic()
        while leftover_processes(str(run_dir)) and time.monotonic() - sent < 10:
            time.sleep(0.1)
        assert leftover_processes(str(run_dir)) == []
        print(f"workers gone {time.monotonic() - sent:.2f} s after the launcher's kill -9")
        assert "the launcher (pid" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        for pid in leftover_processes(str(run_dir)):
            os.kill(pid, signal.SIGKILL)


def _one_rank_signalled(run_dir: str) -> tuple[int, int, bool]:
    """Rank 1 alone records SIGUSR1 during step 5; returns (stop step, signal, saved)."""
    from dist_train.config.load import load_config
    from dist_train.launch.env import dist_session, read_env
    from dist_train.launch.signals import Preempted, StopRequest
    from dist_train.train.build import build_trainer

    overrides = [*RUN[1:], "log.every_steps=3", "train.max_steps=50", f"train.run_dir={run_dir}"]
    cfg = load_config(None, overrides)
    env = read_env("cpu")
    request = StopRequest()
    with dist_session(env, timeout_s=60):
        trainer = build_trainer(cfg, env, request)
        hook = lambda *_: setattr(request, "signum", signal.SIGUSR1)  # noqa: E731
        if env.rank == 1:
            trainer.optimizer.register_step_post_hook(
                lambda *a: hook() if trainer.state.step == 4 else None
            )
        try:
            trainer.fit()
        except Preempted as stop:
            return stop.step, stop.signum, stop.saved is not None
        finally:
            trainer.close()
    raise AssertionError("not stopped")


@pytest.mark.distributed
def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    from conftest import run_on_ranks

    results = run_on_ranks(_one_rank_signalled, 2, str(tmp_path / "vote"))
    # Signalled during step 5; the next log step (every 3) tells both ranks alike. Rank 0 was
    # not signalled itself: it reports signal 0 ("a stop signal").
    assert results == [(6, 0, True), (6, signal.SIGUSR1, True)]
    assert (tmp_path / "vote" / "checkpoints" / "step_0000006").is_dir()


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_the_group_resumes(tmp_path: Path) -> None:
    """--max-restarts: a worker's kill -9 restarts the group, which resumes from the newest
    checkpoint (each attempt on its own keys in the agent's store); SIGTERM then still saves."""
    run_dir = tmp_path / "restart"
    proc = start(run_dir, "--nproc", "2", "--max-restarts", "1", "checkpoint.every_steps=5")
    try:
        wait_for_metrics(run_dir, proc)
        while max(losses(run_dir), default=0) < 12:
            time.sleep(0.05)
        workers = [pid for pid in leftover_processes(str(run_dir)) if pid != proc.pid]
        os.kill(max(workers), signal.SIGKILL)
        killed = time.monotonic()
        discarded = run_dir / "metrics.discarded.jsonl"
        while time.monotonic() - killed < 120 and proc.poll() is None:
            if discarded.exists():
                lost = [json.loads(x)["step"] for x in discarded.read_text().splitlines()]
                resumed = min(lost) - 1
                if resumed + 1 in losses(run_dir):
                    break
            time.sleep(0.05)
        else:
            raise AssertionError(f"no step after the restart; exit {proc.poll()}")
        seconds = time.monotonic() - killed
        assert resumed % 5 == 0 and resumed >= 10  # the newest periodic checkpoint
        print(f"kill -9 to the next completed step: {seconds:.1f} s, {max(lost) - resumed} lost")
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    assert f"resumed from {run_dir}/checkpoints/step_{resumed:07d}" in out
    assert leftover_processes(str(run_dir)) == []


@pytest.mark.slow
def test_a_signal_to_the_whole_job_spares_the_loading_workers(tmp_path: Path) -> None:
    """SLURM signals every process of a job step, DataLoader workers included: they must keep
    serving batches until the training process has saved (a dead one fails the save)."""
    run_dir = tmp_path / "run"
    proc = start(run_dir, "--nproc", "2", "data.num_workers=2", "log.every_steps=5")
    try:
        wait_for_metrics(run_dir, proc)
        os.killpg(proc.pid, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-2000:]
    line = next(x for x in err.splitlines() if x.startswith("preempted (SIGUSR1) at step "))
    step = int(line.split(" at step ")[1].split(":")[0])
    assert (run_dir / "checkpoints" / f"step_{step:07d}").is_dir()
    assert leftover_processes(str(run_dir)) == []
