"""The CLI's small promises: --version, fast --help, one-line usage errors, launch checks that
blame the right key, and a plan that tells the truth (FSDP memory, dropout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_train
from dist_train.config.versions import check_torch_version, parse_version
from dist_train.errors import ConfigError

from conftest import cli

IMPORTS_AFTER = """
import sys
from dist_train.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print("LOADED", *[m for m in ("torch", "torch.distributed.checkpoint", "accelerate")
                  if m in sys.modules])
"""


def modules_loaded(tmp_path: Path, *argv: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-c", IMPORTS_AFTER, *argv],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout.splitlines()[-1].split()[1:]


def one_line_error(proc: subprocess.CompletedProcess[str], start: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


def test_version_and_help_import_no_torch(tmp_path: Path) -> None:
    proc = cli("--version")
    assert proc.returncode == 0 and proc.stdout.strip() == f"dist-train {dist_train.__version__}"
    assert modules_loaded(tmp_path, "--help") == []  # --help costs no torch import
    # check builds the plan (torch) but reads checkpoints without DCP
    assert modules_loaded(tmp_path, "check", "quickstart", f"train.run_dir={tmp_path}/r") == [
        "torch"
    ]


def test_usage_and_launch_errors_are_one_line(tmp_path: Path) -> None:
    run = f"train.run_dir={tmp_path}/run"
    one_line_error(
        cli("train", "quickstart", run, "--nproc", "0"), "error: --nproc=0: must be >= 1"
    )
    one_line_error(
        cli("check", "quickstart", run, "--max-restarts", "2"),
        "error: unrecognized arguments: --max-restarts",
    )
    one_line_error(cli("train"), "error: the following arguments are required: config")
    one_line_error(cli("trian"), "error: argument command: invalid choice")
    if not torch.cuda.is_available():
        one_line_error(
            cli("train", "quickstart", run, "train.device=cuda"),
            "error: train.device='cuda': no CUDA GPU is visible",
        )
    assert not (tmp_path / "run").exists()
    help_text = cli("train", "--help").stdout
    assert "this node's index" in help_text and "nodes taking part" in help_text


def test_torch_floor() -> None:
    assert parse_version("2.13.0+cpu") == (2, 13, 0)
    assert parse_version("2.9.0a0+git1234") == (2, 9, 0)
    assert parse_version("2.10.0rc1") == (2, 10, 0)
    check_torch_version("2.9.0")
    check_torch_version(torch.__version__)  # the installed one passes
    with pytest.raises(ConfigError, match=r"torch='2.8.1': dist_train needs torch >= 2.9"):
        check_torch_version("2.8.1")


@pytest.mark.slow
def test_check_notes_dropout_when_exactness_does_not_hold(tmp_path: Path) -> None:
    run = f"train.run_dir={tmp_path}/run"
    proc = cli("check", "configs/gpt_char.yaml", run, "--nproc", "2")
    assert proc.returncode == 0, proc.stderr
    assert "note: model.dropout=0.1: each rank draws its own dropout masks" in proc.stdout
    quiet = cli("check", "configs/gpt_char.yaml", run, "model.dropout=0")
    assert quiet.returncode == 0 and "note:" not in quiet.stdout
