"""Shared by the `python -m dist_train.gpu_check` tests: the checks' names in the tool's order,
the tool run as a user runs it, and its exit status when called in process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.gpu_check import cli

NAMES = [
    "pytest_gpu",
    "nccl_init",
    "train_bf16",
    "train_fp16",
    "compile",
    "async_checkpoint_resume",
    "export",
    "throughput_gpt2_small",
    "strategies",
]


def gpu_check(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300.0
) -> subprocess.CompletedProcess[str]:
    """The tool as a user runs it, from `cwd`, writing no bytecode into the checkout."""
    full_env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        full_env.pop(var, None)
    return subprocess.run(
        [sys.executable, "-m", "dist_train.gpu_check", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        stdin=subprocess.DEVNULL,
    )


def exit_code(args: list[str]) -> int | str | None:
    with pytest.raises(SystemExit) as exited:
        cli.main(args)
    return exited.value.code
