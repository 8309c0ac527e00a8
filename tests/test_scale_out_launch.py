"""Launches beyond one process: a stalled rank named with its step and phase, copies started by
another launcher refused, two nodes over loopback (rank 0 on node 0, a node that never comes,
node-local run directories), and `accelerate launch`."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from dist_train.errors import EXIT_INFRA

from conftest import CLI, TESTS, cli, leftover_processes
from helpers_scale_out import RUN, losses, popen


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
    # a peer that does not answer is what a retry can fix, not the user's input (2)
    assert proc.returncode == EXIT_INFRA, proc.stderr[-2000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert errors[0].startswith("error: rank 1 is loading data at step 3 (for "), errors
    assert (
        "while rank 0 waited in forward/backward (the gradient all-reduce) at step 3" in errors[0]
    )
    assert "(parallel.timeout_s=5)" in errors[0]
    traceback_file = run_dir / "logs" / "rank_0.traceback.txt"
    assert f"traceback in {traceback_file}" in errors[0]
    assert "Traceback (most recent call last)" in traceback_file.read_text()
    assert errors[1] == (
        "error: worker rank 0 lost a peer, its node or the network (the error above); the "
        "other workers were stopped; exit status 138 (a retry can fix it)"
    )
    assert "Traceback" not in proc.stderr
    assert leftover_processes(str(run_dir)) == []
    print(f"stalled rank: the run ended {seconds:.1f} s after the start (timeout 5 s)")


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
    assert node0.returncode == EXIT_INFRA, err[-2000:]  # a node that never came: retry
    errors = [line for line in err.splitlines() if not line.startswith(("W1", "[W"))]
    assert "frame #" not in err and "[c10d]" not in err  # torch's C++ log stays off
    assert len(errors) == 1 and errors[0].startswith("error: --rdzv-endpoint='127.0.0.1:"), err
    assert "the rendezvous of 2 node(s) failed (Timed out after" in errors[0]
    assert "within --rdzv-timeout=3 s" in errors[0]
    assert "waiting up to 3 s (--rdzv-timeout) for all 2 nodes" in out


def test_a_node_whose_node_zero_never_comes_is_one_line(tmp_path: Path) -> None:
    """Node 1 alone: nobody hosts the store. Its client's retries are torch's C++ log lines,
    each with a 20-line stack dump; the user sees one line, and a status that says retry."""
    from conftest import free_port

    node1 = launch_node(1, tmp_path / "alone", free_port(), "--rdzv-timeout", "3")
    _, err = node1.communicate(timeout=120)
    assert node1.returncode == EXIT_INFRA, err[-2000:]
    assert "frame #" not in err and "[c10d]" not in err, err[-2000:]
    (error,) = [line for line in err.splitlines() if not line.startswith(("W1", "[W"))]
    assert error.startswith("error: --rdzv-endpoint='127.0.0.1:"), err
    assert "the rendezvous of 2 node(s) failed (node 0's endpoint did not answer)" in error


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
