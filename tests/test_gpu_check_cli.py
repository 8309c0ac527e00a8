"""`python -m dist_train.gpu_check` on CPU without running real checks: arguments, the dry run,
the no-CUDA report, a failing check beside the others, pytest's summary line, and the
--steps-scale sizes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.gpu_check import checks, cli
from dist_train.gpu_check.checks import CHECKS, pytest_counts
from dist_train.gpu_check.runner import Check, CheckSkipped, Context

from helpers_gpu_check import NAMES, exit_code, gpu_check


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--only", "train_bf16,nope"],
            "--only=train_bf16,nope: expected one of pytest_gpu, nccl_init, ",
        ),
        (["--only", ","], "--only=,: expected one of pytest_gpu"),
        (["--steps-scale", "0"], "--steps-scale=0.0: expected a number > 0"),
        (
            ["--out", "/no/such/dir/r.json"],
            "--out=/no/such/dir/r.json: directory /no/such/dir does not",
        ),
    ],
)
def test_bad_arguments_are_one_line_exit_2(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    assert exit_code(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and len(err.strip().splitlines()) == 1, err
    assert exit_code(["--device", "tpu"]) == 2  # argparse's own refusals: status 2 as well
    assert not list(tmp_path.iterdir())  # nothing written


def test_dry_run_lists_every_check_without_touching_cuda(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def touched(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the dry run touched CUDA")

    for name in ("is_available", "device_count", "get_device_properties", "init"):
        monkeypatch.setattr(torch.cuda, name, touched)
    monkeypatch.chdir(tmp_path)
    assert exit_code(["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == NAMES
    assert all(len(line.split()) > 3 for line in lines)  # each with its description
    assert exit_code(["--dry-run", "--only", "export,nccl_init"]) == 0
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == [
        "nccl_init",
        "export",
    ]
    assert not list(tmp_path.iterdir())


def test_without_cuda_every_check_is_skipped_and_the_exit_status_is_3(tmp_path: Path) -> None:
    proc = gpu_check(cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})  # no GPU, even on a GPU box
    assert proc.returncode == 3, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "no CUDA device" in proc.stderr
    assert "Traceback" not in proc.stderr and not proc.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())  # the default --out
    assert (data["status"], data["exit_status"], data["mode"]) == ("no_cuda", 3, "cuda")
    assert list(data["checks"]) == NAMES
    for result in data["checks"].values():
        assert result["status"] == "skip" and result["reason"].startswith("no CUDA device")
    assert data["torch_version"] == torch.__version__ and data["device_count"] == 0
    for key in (
        "cuda_version",
        "device_name",
        "total_memory_bytes",
        "dist_train_version",
        "wall_s",
    ):
        assert key in data


def test_a_failing_check_keeps_its_numbers_and_the_others_still_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def measures_then_fails(ctx: Context, numbers: dict[str, Any]) -> str:
        numbers["measured"] = 1.5
        raise RuntimeError("CUDA error: an illegal memory access\nsecond line")

    def skips(ctx: Context, numbers: dict[str, Any]) -> str:
        raise CheckSkipped("not on this machine")

    def passes(ctx: Context, numbers: dict[str, Any]) -> str:
        numbers["value"] = 2
        return "fine"

    fake = (
        Check("a", "fails", measures_then_fails),
        Check("b", "skips", skips),
        Check("c", "passes", passes),
    )
    monkeypatch.setattr(checks, "CHECKS", fake)
    assert exit_code(["--device", "cpu", "--out", str(tmp_path / "r.json")]) == 1
    data = json.loads((tmp_path / "r.json").read_text())
    assert (data["status"], data["exit_status"]) == ("fail", 1)
    a, b, c = data["checks"].values()
    assert (a["status"], a["error"], a["numbers"]) == (
        "fail",
        "RuntimeError: CUDA error: an illegal memory access",
        {"measured": 1.5},
    )
    assert "Traceback" in a["traceback"] and "measures_then_fails" in a["traceback"]
    assert (b["status"], b["reason"]) == ("skip", "not on this machine")
    assert (c["status"], c["summary"], c["numbers"]) == ("pass", "fine", {"value": 2})
    assert "3 checks: 1 pass, 1 fail, 1 skip" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            ".s\n1 passed, 2 skipped, 120 deselected in 3.21s\n",
            {"passed": 1, "skipped": 2, "deselected": 120},
        ),
        (
            "FAILED tests/a.py::t - 3 passed earlier\n1 failed, 1 passed, 2 errors in 2.00s",
            {"failed": 1, "passed": 1, "errors": 2},
        ),
        (
            "SKIPPED [1] tests/a.py:3: needs CUDA\n1 skipped, 129 deselected in 4.10s",
            {"skipped": 1, "deselected": 129},
        ),
        ("no tests ran in 0.01s", {}),
    ],
)
def test_pytest_summary_counts(output: str, expected: dict[str, int]) -> None:
    zeros = dict.fromkeys(("passed", "failed", "skipped", "errors", "deselected"), 0)
    assert pytest_counts(output) == {**zeros, **expected}


def test_steps_scale_keeps_every_check_meaningful() -> None:
    tiny = cli.GPU.scaled(0.001)
    assert (tiny.train_steps, tiny.compile_steps, tiny.resume_every, tiny.timed_steps) == (
        20,
        20,
        2,
        2,
    )
    double = cli.GPU.scaled(2.0)
    assert (double.train_steps, double.timed_steps) == (400, 100)
    assert double.big_model == cli.GPU.big_model and double.warmup_steps == cli.GPU.warmup_steps
    assert [c.name for c in CHECKS] == NAMES
