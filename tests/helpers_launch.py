"""Shared by the launch/ recipe tests: stand-ins for `dist-train` and SLURM's `srun` and
`scontrol` on PATH, and a recipe run whose printed argv is returned."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from conftest import REPO

PREEMPTED = 143  # dist-train's "checkpoint saved, resubmit to continue"


def fake_bin(tmp_path: Path) -> dict[str, str]:
    """`dist-train` that prints its arguments and exits $DT_EXIT; `srun`/`scontrol` stand-ins
    for SLURM. `scontrol` (but `show hostnames`) appends its argv to tmp/scontrol.log and exits
    $SCONTROL_EXIT; `srun` writes its ignored-signal mask to $SRUN_MARK, if set, then sleeps
    $SRUN_SLEEP seconds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    scripts = {
        "dist-train": 'printf "%s\\n" "$@"\nexit "${DT_EXIT:-0}"',
        "scontrol": f'if [[ $1 == show ]]; then printf "node-a\\nnode-b\\n"\n'
        f'else echo "$*" >> "{log}"; exit "${{SCONTROL_EXIT:-0}}"; fi',
        # run the per-node command as node 1 would
        "srun": '[[ -z ${SRUN_MARK:-} ]] || grep SigIgn /proc/$$/status > "$SRUN_MARK"\n'
        'sleep "${SRUN_SLEEP:-0}"\nSLURM_NODEID=1 "$@"',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    # The recipes read these; the machine running the tests may have its own.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLURM_") and k not in ("NPROC", "RDZV_PORT")
    }
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}"}


def run(cmd: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()
