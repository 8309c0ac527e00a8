"""Shared by the launch/ recipe tests: stand-ins for `dist-train` and SLURM's `srun` and
`scontrol` on PATH, and a recipe run whose printed argv is returned."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from dist_train.errors import EXIT_INFRA, EXIT_PREEMPTED

from conftest import REPO

PREEMPTED = EXIT_PREEMPTED  # dist-train's "checkpoint saved, resubmit to continue"
INFRA = EXIT_INFRA  # dist-train's "a node, a peer or the network was lost: retry"


def fake_bin(tmp_path: Path) -> dict[str, str]:
    """`dist-train` that prints its arguments, writes checkpoint $DT_SAVE (e.g. step_0000040)
    into $DT_RUN_DIR (default tmp/run) if set, and exits $DT_EXIT (`check --print` prints
    $DT_RUN_DIR); `srun`/`scontrol` stand-ins for SLURM. `scontrol show job` says JobState
    $JOB_STATE (default RUNNING); other `scontrol` calls but `show` append their argv to
    tmp/scontrol.log and exit $SCONTROL_EXIT, or, with SCONTROL_ENDS_JOB set, end the batch
    shell's attempt as SLURM's requeue does (SIGTERM to it) and exit 143; `srun` writes its
    ignored-signal mask to $SRUN_MARK, if set, then sleeps $SRUN_SLEEP seconds."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "scontrol.log"
    scripts = {
        "dist-train": 'if [[ $1 == check ]]; then echo "$DT_RUN_DIR"; exit 0; fi\n'
        'printf "%s\\n" "$@"\n'
        'if [[ -n ${DT_SAVE:-} ]]; then mkdir -p "$DT_RUN_DIR/checkpoints/$DT_SAVE"\n'
        '  touch "$DT_RUN_DIR/checkpoints/$DT_SAVE/manifest.json"; fi\n'
        'exit "${DT_EXIT:-0}"',
        "scontrol": 'if [[ $1 == show && $2 == hostnames ]]; then printf "node-a\\nnode-b\\n"\n'
        'elif [[ $1 == show ]]; then printf "JobId=77\\n   JobState=%s Reason=None\\n" '
        '"${JOB_STATE:-RUNNING}"\n'
        f'else echo "$*" >> "{log}"\n'
        '  if [[ -n ${SCONTROL_ENDS_JOB:-} ]]; then kill -TERM "$PPID"; exit 143; fi\n'
        '  exit "${SCONTROL_EXIT:-0}"; fi',
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
    return {**env, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DT_RUN_DIR": str(tmp_path / "run")}


def run(cmd: list[str], env: dict[str, str]) -> list[str]:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()
