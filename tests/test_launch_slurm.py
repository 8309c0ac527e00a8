"""launch/slurm.sbatch: workers per node from SLURM's variables, the #SBATCH header, and the
retryable exit statuses (143: checkpoint saved, 138: a node lost) turned into a requeue when the
attempt saved a new checkpoint, not after `scancel` or SLURM's own requeue."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers_launch import INFRA, PREEMPTED, fake_bin

# --- SLURM ---------------------------------------------------------------------------------

SBATCH = ["bash", "launch/slurm.sbatch", "c.yaml", "a=1"]


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        **fake_bin(tmp_path),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "77",
        **extra,
    }


def slurm_argv(nproc: str, port: str = "29400") -> list[str]:
    return [
        "train",
        "c.yaml",
        "--nproc",
        nproc,
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        f"node-a:{port}",
        "--rdzv-id",
        "77",
        "a=1",
    ]


def sbatch(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(SBATCH, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("extra", "nproc"),
    [
        ({"SLURM_GPUS_ON_NODE": "8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "a100:4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "2"}, "2"),
        ({"SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "a100:4"}, "8"),
        ({"NPROC": "3", "SLURM_GPUS_ON_NODE": "8", "SLURM_GPUS_PER_NODE": "a100:4"}, "3"),
    ],
)
def test_slurm_workers_per_node(tmp_path: Path, extra: dict[str, str], nproc: str) -> None:
    proc = sbatch(slurm_env(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv(nproc)
    assert "1 worker per node" not in proc.stderr


def test_slurm_without_gpus_says_one_worker_and_how_to_change_it(tmp_path: Path) -> None:
    proc = sbatch(slurm_env(tmp_path, RDZV_PORT="29555"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("1", port="29555")
    line = next(x for x in proc.stderr.splitlines() if "1 worker per node" in x)
    assert "NPROC=" in line
    assert "--gpus-per-node" in line


def test_slurm_unreadable_gpu_count_is_an_error_before_srun(tmp_path: Path) -> None:
    proc = sbatch(slurm_env(tmp_path, SLURM_GPUS_PER_NODE="a100:x"))
    assert proc.returncode == 2
    assert proc.stdout == ""  # dist-train never started
    assert "SLURM_GPUS_PER_NODE=a100:x" in proc.stderr
    assert "NPROC" in proc.stderr


def sbatch_options() -> list[str]:
    """The #SBATCH lines sbatch reads: those before the first command."""
    options = []
    for line in (REPO / "launch/slurm.sbatch").read_text().splitlines()[1:]:
        if line.strip() and not line.startswith("#"):
            break
        if line.startswith("#SBATCH "):
            options.append(line.removeprefix("#SBATCH ").split(" #")[0].strip())
    return options


def test_slurm_header_asks_for_warning_signal_requeue_and_appended_log() -> None:
    options = sbatch_options()
    signal_opts = [o for o in options if o.startswith("--signal=")]
    assert len(signal_opts) == 1
    # No "B:": the job step's processes (dist-train and its workers) must get it, not the shell.
    sig, _, seconds = signal_opts[0].removeprefix("--signal=").partition("@")
    assert sig in ("USR1", "SIGUSR1")
    assert int(seconds) >= 60  # time to save before SIGTERM/SIGKILL at the limit
    assert "--requeue" in options
    assert "--open-mode=append" in options
    assert "--ntasks-per-node=1" in options


CHECKPOINT = "step_0000040"


def saved(tmp_path: Path) -> str:
    return str(tmp_path / "run" / "checkpoints" / CHECKPOINT)


@pytest.mark.parametrize("restart", [None, "2"])
def test_slurm_preempted_run_is_requeued(tmp_path: Path, restart: str | None) -> None:
    """The time-limit warning (SIGUSR1 to the job step, not to this shell): dist-train saved
    and exited 143, so the job is requeued."""
    extra = {"DT_EXIT": str(PREEMPTED), "DT_SAVE": CHECKPOINT, "SLURM_GPUS_ON_NODE": "8"}
    if restart is not None:
        extra["SLURM_RESTART_COUNT"] = restart
    proc = sbatch(slurm_env(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("8")
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
    assert f"checkpoint saved: {saved(tmp_path)}; requeueing job 77" in proc.stderr
    assert ("restart 2" in proc.stderr) == (restart is not None)


def test_slurm_lost_node_is_requeued(tmp_path: Path) -> None:
    """138: a node, a peer or the network was lost; the periodic checkpoints of the attempt are
    its progress, so a retry continues from them."""
    proc = sbatch(slurm_env(tmp_path, DT_EXIT=str(INFRA), DT_SAVE=CHECKPOINT))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
    assert "dist-train lost a node, a peer or the network (exit status 138)" in proc.stderr


@pytest.mark.parametrize("status", [PREEMPTED, INFRA])
def test_slurm_attempt_without_a_new_checkpoint_is_not_requeued(
    tmp_path: Path, status: int
) -> None:
    """A start-up longer than the time limit minus 120 s is stopped by the warning before it
    saves: requeueing would repeat that forever. Only a checkpoint of this attempt counts."""
    old = tmp_path / "run" / "checkpoints" / "step_0000020"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    proc = sbatch(slurm_env(tmp_path, DT_EXIT=str(status)))
    assert proc.returncode == status, proc.stderr
    assert not (tmp_path / "scontrol.log").exists()
    (line,) = [x for x in proc.stderr.splitlines() if "no new checkpoint" in x]
    assert f"(newest: {old})" in line and "not requeued" in line
    assert "checkpoint saved" not in proc.stderr


def test_slurm_failed_requeue_keeps_the_preempted_status(tmp_path: Path) -> None:
    env = slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), DT_SAVE=CHECKPOINT, SCONTROL_EXIT="1")
    proc = sbatch(env)
    assert proc.returncode == PREEMPTED
    assert "scontrol requeue failed (status 1, job state RUNNING): resubmit" in proc.stderr


def test_slurm_requeue_that_ends_the_attempt_is_a_requeue(tmp_path: Path) -> None:
    """SLURM ends the running attempt as it requeues it: SIGTERM to this shell, and scontrol
    may be stopped on the way (status 143). The job is requeued all the same: said so."""
    env = slurm_env(
        tmp_path,
        DT_EXIT=str(PREEMPTED),
        DT_SAVE=CHECKPOINT,
        SCONTROL_ENDS_JOB="1",
        JOB_STATE="REQUEUED",
    )
    proc = sbatch(env)
    assert proc.returncode == 0, proc.stderr
    assert "job 77 is requeued (state REQUEUED" in proc.stderr
    assert "failed" not in proc.stderr
    assert "SIGTERM" not in proc.stderr  # the requeue's own signal is no cancel


@pytest.mark.parametrize("status", [1, 2, 137])
def test_slurm_other_failures_are_not_requeued(tmp_path: Path, status: int) -> None:
    proc = sbatch(slurm_env(tmp_path, DT_EXIT=str(status), DT_SAVE=CHECKPOINT))
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("1")
    assert not (tmp_path / "scontrol.log").exists()


def sbatch_terminated(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The batch script, sent SIGTERM (as SLURM sends it: to the shell alone) while srun runs."""
    mark = Path(env["DT_RUN_DIR"]).parent / "srun-started"
    env = {**env, "SRUN_MARK": str(mark), "SRUN_SLEEP": "2"}
    proc = subprocess.Popen(
        SBATCH, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not mark.exists() or not mark.read_text().endswith("\n"):
            assert proc.poll() is None and time.monotonic() < deadline, "srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    # srun (and so the workers) can still be stopped: the script traps SIGTERM, not ignores it
    assert not int(mark.read_text().split()[1], 16) & (1 << (signal.SIGTERM - 1))
    return subprocess.CompletedProcess(SBATCH, proc.returncode, out, err)


@pytest.mark.parametrize("state", ["RUNNING", "TIMEOUT", "PREEMPTED"])
def test_slurm_sigterm_to_the_batch_shell_waits_for_srun(tmp_path: Path, state: str) -> None:
    """SLURM signals the batch shell too (the time limit, preemption's grace time): the script
    must outlive srun, whose workers are saving, and still requeue on its 143."""
    env = slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), DT_SAVE=CHECKPOINT, JOB_STATE=state)
    proc = sbatch_terminated(env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("1")  # srun's command ran to the end
    assert f"SIGTERM (job state {state})" in proc.stderr
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]


def test_slurm_scancel_saves_and_ends_the_job(tmp_path: Path) -> None:
    """A plain `scancel JOBID`: SIGTERM to the shell and the job step, the job CANCELLED. The
    workers save (143), and the job ends instead of coming back."""
    env = slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), DT_SAVE=CHECKPOINT, JOB_STATE="CANCELLED")
    proc = sbatch_terminated(env)
    assert proc.returncode == PREEMPTED, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("1")
    assert not (tmp_path / "scontrol.log").exists()
    assert f"job 77 was cancelled (state CANCELLED); it saved {saved(tmp_path)}" in proc.stderr
    assert "not requeued; resubmit the same command to continue" in proc.stderr


def test_slurm_requeued_by_hand_is_not_requeued_again(tmp_path: Path) -> None:
    """`scontrol requeue JOBID` from outside: SLURM ends the attempt (SIGTERM) and requeues the
    job itself; the script says so and does not requeue it a second time."""
    env = slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), DT_SAVE=CHECKPOINT, JOB_STATE="REQUEUED")
    proc = sbatch_terminated(env)
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "scontrol.log").exists()
    assert "SLURM is requeueing job 77 itself (state REQUEUED)" in proc.stderr
    assert "failed" not in proc.stderr
