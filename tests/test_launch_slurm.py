"""launch/slurm.sbatch: workers per node from SLURM's variables, the #SBATCH header, and the
preemption exit status (143: checkpoint saved) turned into a requeue, also when SLURM signals
the batch shell."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO
from helpers_launch import PREEMPTED, fake_bin

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


@pytest.mark.parametrize("restart", [None, "2"])
def test_slurm_preempted_run_is_requeued(tmp_path: Path, restart: str | None) -> None:
    extra = {"DT_EXIT": str(PREEMPTED), "SLURM_GPUS_ON_NODE": "8"}
    if restart is not None:
        extra["SLURM_RESTART_COUNT"] = restart
    proc = sbatch(slurm_env(tmp_path, **extra))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("8")
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
    assert "requeue" in proc.stderr
    assert ("restart 2" in proc.stderr) == (restart is not None)


def test_slurm_failed_requeue_keeps_the_preempted_status(tmp_path: Path) -> None:
    proc = sbatch(slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), SCONTROL_EXIT="1"))
    assert proc.returncode == PREEMPTED
    assert "resubmit" in proc.stderr


@pytest.mark.parametrize("status", [1, 137])
def test_slurm_other_failures_are_not_requeued(tmp_path: Path, status: int) -> None:
    proc = sbatch(slurm_env(tmp_path, DT_EXIT=str(status)))
    assert proc.returncode == status, proc.stderr
    assert proc.stdout.splitlines() == slurm_argv("1")
    assert not (tmp_path / "scontrol.log").exists()


def test_slurm_sigterm_to_the_batch_shell_waits_for_srun(tmp_path: Path) -> None:
    """SLURM signals the batch shell too (time limit, preemption): the script must outlive srun,
    whose workers are saving, and still requeue on its 143."""
    mark = tmp_path / "srun-started"
    env = slurm_env(tmp_path, DT_EXIT=str(PREEMPTED), SRUN_MARK=str(mark), SRUN_SLEEP="2")
    proc = subprocess.Popen(
        SBATCH, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 20
        while not mark.exists() or not mark.read_text().endswith("\n"):
            assert proc.poll() is None and time.monotonic() < deadline, "srun never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # the batch shell only, as SLURM's is
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert out.splitlines() == slurm_argv("1")  # srun's command ran to the end
    # srun (and so the workers) can still be stopped: the script traps SIGTERM, not ignores it
    assert not int(mark.read_text().split()[1], 16) & (1 << (signal.SIGTERM - 1))
    assert "SIGTERM" in err
    assert (tmp_path / "scontrol.log").read_text().splitlines() == ["requeue 77"]
