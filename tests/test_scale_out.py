"""Preemption, launcher death and stalled ranks, with real processes and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import CLI, TESTS, TINY_GPT, cli, leftover_processes, wait_for_metrics

# decay_steps is fixed so that runs of different lengths follow the same schedule step by step.
RUN = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "model.dropout=0.1",
    "optim.decay_steps=400",
    "log.every_steps=1",
    "train.eval_every=0",
    "train.sample_chars=0",
    "train.global_batch_size=8",
]


def popen(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    """The real `dist-train` in its own session (signals go to it alone), piped."""
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        env.pop(var, None)
    return subprocess.Popen(
        [str(CLI), *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )


def start(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    """`dist-train train` for 100000 steps, until a signal stops it."""
    run = [*RUN, *args, "train.max_steps=100000", f"train.run_dir={run_dir}"]
    return popen("train", *run, cwd=run_dir.parent)


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def stop_with(proc: subprocess.Popen[str], run_dir: Path, signum: int) -> tuple[str, float]:
    """Wait for a few steps, send `signum` to the launcher alone; stderr and seconds to exit."""
    try:
        wait_for_metrics(run_dir, proc)
        while len(losses(run_dir)) < 3:
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        return err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("nproc", "signum", "extra"),
    [
        (1, signal.SIGTERM, []),
        (2, signal.SIGUSR1, ["checkpoint.async_save=true", "checkpoint.every_steps=2"]),
    ],
    ids=["1-process-SIGTERM", "2-workers-SIGUSR1-async"],
)
def test_stop_signal_saves_at_the_step_reached_and_resume_is_bitwise(
    tmp_path: Path, nproc: int, signum: int, extra: list[str]
) -> None:
    cut = tmp_path / "cut"
    args = ["--nproc", str(nproc), *extra]
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
    if nproc == 1:
        return  # a single process resumes bitwise: test_checkpoint; here the signal path
    # Continue to a few steps past the stop, and train the same steps in one go: bitwise equal.
    more = [*args[:2], *extra, f"train.max_steps={step + 4}"]
    resumed = cli("train", *RUN, *more, f"train.run_dir={cut}", timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {cut}/checkpoints/step_{step:07d}" in resumed.stdout
    ref = tmp_path / "ref"
    full = cli("train", *RUN, *more, f"train.run_dir={ref}", timeout=240)
    assert full.returncode == 0, full.stderr[-2000:]
    assert losses(cut) == losses(ref)  # exact float equality, every step
    assert leftover_processes(str(cut)) == []


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


@pytest.mark.slow
def test_a_stalled_rank_is_named_with_its_step_and_phase(tmp_path: Path) -> None:
    run_dir = tmp_path / "stall"
    started = time.monotonic()
    proc = cli(
        "train",
        "configs/mlp_synthetic.yaml",
        "--nproc",
        "2",
        "data._target_=user_plugins.StallOnRankOne",
        "model._target_=user_plugins.TinyRegressor",
        "model.kwargs.in_features=8",
        "parallel.timeout_s=5",
        "train.max_steps=50",
        f"train.run_dir={run_dir}",
        timeout=180,
    )
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors[0].startswith("error: rank 1 is loading data at step 3 (for "), errors
    assert (
        "while rank 0 waited in forward/backward (the gradient all-reduce) at step 3" in errors[0]
    )
    assert "(parallel.timeout_s=5)" in errors[0]
    traceback_file = run_dir / "logs" / "rank_0.traceback.txt"
    assert f"traceback in {traceback_file}" in errors[0]
    assert "Traceback (most recent call last)" in traceback_file.read_text()
    assert (
        errors[1]
        == "error: worker rank 0 stopped the run with the error above; the other workers were stopped"
    )
    assert "Traceback" not in proc.stderr
    assert leftover_processes(str(run_dir)) == []
    print(f"stalled rank: the run ended {seconds:.1f} s after the start (timeout 5 s)")


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


@pytest.mark.parametrize(
    "var", ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS", "WORLD_SIZE"]
)
def test_copies_started_by_another_launcher_are_refused(var: str, tmp_path: Path) -> None:
    proc = cli("train", *RUN, f"train.run_dir={tmp_path}/run", env={var: "2", "RANK": "1"})
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {var}=2: "), proc.stderr
    assert "--nnodes, --node-rank and --rdzv-endpoint" in lines[0]
    assert not (tmp_path / "run").exists()


def test_one_copy_per_node_is_what_multi_node_launches_look_like() -> None:
    from dist_train.launch.env import foreign_launch

    assert foreign_launch(2, {"SLURM_STEP_NUM_TASKS": "2", "OMPI_COMM_WORLD_SIZE": "2"}) is None
    assert foreign_launch(1, {"SLURM_STEP_NUM_TASKS": "1", "WORLD_SIZE": "1"}) is None
    assert foreign_launch(3, {"WORLD_SIZE": "3", "RANK": "2"}) is None
    assert "started 4 copies" in str(foreign_launch(2, {"SLURM_STEP_NUM_TASKS": "4"}))


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


def launch_node(node: int, run_dir: Path, port: int, *extra: str) -> subprocess.Popen[str]:
    """One node's `dist-train` on this machine (a two-node launch over loopback)."""
    args = ["--nnodes", "2", "--node-rank", str(node), "--rdzv-endpoint", f"127.0.0.1:{port}"]
    return popen("train", *RUN, *args, *extra, f"train.run_dir={run_dir}", cwd=run_dir.parent)


@pytest.mark.slow
def test_node_zero_holds_rank_zero_whichever_node_comes_first(tmp_path: Path) -> None:
    from conftest import free_port

    run_dir, port = tmp_path / "nodes", free_port()
    node1 = launch_node(1, run_dir, port, "train.max_steps=6")
    time.sleep(3)  # node 1 arrives first and waits
    node0 = launch_node(0, run_dir, port, "train.max_steps=6")
    out0, err0 = node0.communicate(timeout=240)
    out1, err1 = node1.communicate(timeout=60)
    assert node0.returncode == 0 and node1.returncode == 0, err0[-2000:] + err1[-2000:]
    assert "dist-train: node 1 of 2 (" in out1
    assert "waiting up to 600 s (--rdzv-timeout) for all 2 nodes at 127.0.0.1:" in out1
    assert "step 6 loss" in out0 and "step 6 loss" not in out1  # rank 0 is node 0's worker
    assert sorted(losses(run_dir)) == list(range(1, 7))  # (equal to --nproc 2: test_multinode)


def test_a_node_that_never_comes_is_one_line_after_the_rendezvous_timeout(tmp_path: Path) -> None:
    from conftest import free_port

    run_dir = tmp_path / "alone"
    node0 = launch_node(0, run_dir, free_port(), "--rdzv-timeout", "3")
    out, err = node0.communicate(timeout=120)
    assert node0.returncode == 2, err[-2000:]
    errors = [line for line in err.splitlines() if not line.startswith(("W1", "[W"))]
    assert len(errors) == 1 and errors[0].startswith("error: --rdzv-endpoint='127.0.0.1:"), err
    assert "the rendezvous of 2 node(s) failed (Timed out after" in errors[0]
    assert "within --rdzv-timeout=3 s" in errors[0]
    assert "waiting up to 3 s (--rdzv-timeout) for all 2 nodes" in out


@pytest.mark.slow
def test_node_local_run_directories_are_refused(tmp_path: Path) -> None:
    """Node 1 writes to a directory node 0 cannot see (as a node-local disk would)."""
    from conftest import free_port

    port = free_port()
    (tmp_path / "node1").mkdir()
    node1 = launch_node(1, tmp_path / "node1" / "run", port)
    node0 = launch_node(0, tmp_path / "run", port)
    _, err0 = node0.communicate(timeout=240)
    node1.communicate(timeout=60)
    assert node0.returncode == 2, err0[-2000:]
    said = [line for line in err0.splitlines() if line.startswith("error: ")]
    assert said[0].startswith(f"error: train.run_dir='{tmp_path / 'run'}': rank 1 on "), said
    assert "cannot see what rank 0 wrote there" in said[0]
    assert list((tmp_path / "run").glob(".shared-check-*")) == []  # nothing left behind
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_accelerate_launch_modes(tmp_path: Path) -> None:
    """`--multi_gpu` runs torchrun underneath: 2 workers, also on CPU. `--cpu` alone starts
    one process, and dist-train says so."""
    pytest.importorskip("accelerate", reason="the accelerate extra is not installed")
    accelerate = str(Path(CLI).with_name("accelerate"))
    env = {**os.environ, "PYTHONPATH": str(TESTS), "HF_HOME": str(tmp_path / "hf")}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        env.pop(var, None)
    runs = {
        "multi": ["--multi_gpu", "--num_processes", "2"],
        "cpu": ["--cpu", "--num_processes", "2"],
    }
    out = {}
    for name, flags in runs.items():
        proc = subprocess.run(
            [
                accelerate,
                "launch",
                *flags,
                "--num_machines",
                "1",
                "--mixed_precision",
                "no",
                "--dynamo_backend",
                "no",
                "-m",
                "dist_train",
                "train",
                *RUN,
                "train.max_steps=4",
                f"train.run_dir={tmp_path / name}",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = proc.stdout
    assert "dist-train: 2 workers (1 node(s)), gloo on cpu" in out["multi"], out["multi"][-2000:]
    assert "note: `accelerate launch` started a single process" in out["cpu"]


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
