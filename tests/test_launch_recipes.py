"""launch/ recipes are thin: they call `dist-train train` with the right flags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO


def fake_bin(tmp_path: Path) -> dict[str, str]:
    """`dist-train` that prints its arguments; `srun`/`scontrol` stand-ins for SLURM."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scripts = {
        "dist-train": 'printf "%s\\n" "$@"',
        "scontrol": 'printf "node-a\\nnode-b\\n"',
        "srun": 'SLURM_NODEID=1 "$@"',  # run the per-node command as node 1 would
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run(cmd: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_local(tmp_path: Path) -> None:
    env = fake_bin(tmp_path)
    assert run(["launch/local.sh", "c.yaml", "4", "optim.lr=1"], env) == [
        "train",
        "c.yaml",
        "--nproc",
        "4",
        "optim.lr=1",
    ]
    assert run(["launch/local.sh", "c.yaml"], env) == ["train", "c.yaml", "--nproc", "1"]


def test_multinode(tmp_path: Path) -> None:
    env = {**fake_bin(tmp_path), "NNODES": "2", "NODE_RANK": "1", "RDZV": "h0:29400", "NPROC": "8"}
    assert run(["launch/multinode.sh", "c.yaml", "a=1"], env) == [
        "train",
        "c.yaml",
        "--nproc",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "h0:29400",
        "--rdzv-id",
        "dist_train",
        "a=1",
    ]


def test_slurm(tmp_path: Path) -> None:
    env = {
        **fake_bin(tmp_path),
        "SLURM_JOB_NODELIST": "node-[a-b]",
        "SLURM_NNODES": "2",
        "SLURM_GPUS_ON_NODE": "8",
        "SLURM_JOB_ID": "77",
    }
    assert run(["bash", "launch/slurm.sbatch", "c.yaml", "a=1"], env) == [
        "train",
        "c.yaml",
        "--nproc",
        "8",
        "--nnodes",
        "2",
        "--node-rank",
        "1",
        "--rdzv-endpoint",
        "node-a:29400",
        "--rdzv-id",
        "77",
        "a=1",
    ]
