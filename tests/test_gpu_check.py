"""`python -m dist_train.gpu_check` on CPU: arguments, the dry run, the no-CUDA report, and
real checks on tiny sizes (`--device cpu`) writing a real JSON report."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_train.data.datasets import DataSpec
from dist_train.gpu_check import checkpoint_checks, checks, cli, train_checks
from dist_train.gpu_check.checks import CHECKS, pytest_counts
from dist_train.gpu_check.runner import Check, CheckFailed, CheckSkipped, Context
from dist_train.gpu_check.training import TrainRun

REPO = Path(__file__).resolve().parents[1]
NAMES = [
    "pytest_gpu",
    "nccl_init",
    "train_bf16",
    "train_fp16",
    "compile",
    "async_checkpoint_resume",
    "export",
    "throughput_gpt2_small",
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


def test_cpu_run_of_real_checks_writes_their_results(tmp_path: Path) -> None:
    out = tmp_path / "results" / "cpu.json"
    out.parent.mkdir()
    proc = gpu_check(
        "--device", "cpu", "--only", "export,train_bf16", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 checks: 2 pass, 0 fail, 0 skip" in proc.stdout
    data = json.loads(out.read_text())
    assert (data["status"], data["exit_status"], data["mode"]) == ("pass", 0, "cpu")
    assert list(data["checks"]) == ["train_bf16", "export"]  # the tool's order, not --only's
    train, export = data["checks"]["train_bf16"], data["checks"]["export"]
    assert train["status"] == export["status"] == "pass"
    assert train["error"] is None and 0 < train["duration_s"] < data["wall_s"]
    n = train["numbers"]
    assert n["steps"] == cli.CPU.train_steps and n["steps_per_sec"] > 0
    assert n["last_loss"] < train_checks.LOSS_FALL * n["first_loss"]
    assert train["summary"].startswith(f"loss {n['first_loss']:.3f} -> {n['last_loss']:.3f}")
    e = export["numbers"]
    assert e["weights_bitwise"] and e["outputs_bitwise"] and e["outputs_max_abs_diff"] == 0.0
    assert e["file_bytes"] > 0 and e["tensors"] > 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["cpu.json", "results"]  # runs in /tmp


@pytest.mark.slow
def test_cpu_run_of_the_other_checks(tmp_path: Path) -> None:
    """Everything but `compile` (minutes of C++ compilation on a CPU) on tiny sizes."""
    names = [
        "pytest_gpu",
        "nccl_init",
        "train_fp16",
        "async_checkpoint_resume",
        "throughput_gpt2_small",
    ]
    proc = gpu_check(
        "--device", "cpu", "--only", ",".join(names), "--out", "r.json", cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert {name: r["status"] for name, r in results.items()} == dict.fromkeys(names, "pass")
    n = {name: r["numbers"] for name, r in results.items()}
    assert n["pytest_gpu"]["failed"] == 0 and n["pytest_gpu"]["deselected"] > 0
    assert n["nccl_init"]["backend"] == "gloo" and n["nccl_init"]["all_reduce_ok"]
    assert n["train_fp16"]["loss_scale"] > 0 and n["train_fp16"]["skipped_steps"] >= 0
    resume = n["async_checkpoint_resume"]
    assert resume["losses_bitwise"] and resume["weights_bitwise"] and resume["strict_determinism"]
    assert f"step_{resume['k']:07d}" in resume["cut_run_checkpoints"]
    assert resume["staged_bytes"] > 0 and not resume["pin_requested"]  # CPU: plain memory
    speed = n["throughput_gpt2_small"]
    assert speed["tokens_per_sec"] > 0 and speed["mfu"] is None  # no known peak for a CPU


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


def fake_run(losses: dict[int, float], model: nn.Module) -> TrainRun:
    return TrainRun(losses, [], model, DataSpec("lm"), None, 1.0)


def test_resume_check_falls_back_from_strict_determinism_and_reports_the_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU may do: strict determinism refused by some kernel, then a run that is close
    but not bitwise. The check records both and fails with the size of the difference."""
    tags = []

    def stop_and_resume(ctx: Context, k: int, tag: str) -> tuple[TrainRun, TrainRun, list[str]]:
        tags.append(tag)
        assert torch.are_deterministic_algorithms_enabled()
        if tag == "strict":
            raise RuntimeError(
                "scatter_add_cuda_kernel does not have a deterministic implementation"
            )
        model = nn.Linear(2, 2)
        other = copy.deepcopy(model)
        with torch.no_grad():
            other.weight[0, 0] += 1e-3
        later = {s: 1.0 for s in range(k + 1, 2 * k + 1)}
        return (
            fake_run({1: 2.0, **later}, model),
            fake_run({**later, 2 * k: 1.0 + 1e-6}, other),
            [f"step_{k:07d}"],
        )

    monkeypatch.setattr(checkpoint_checks, "stop_and_resume", stop_and_resume)
    numbers: dict[str, Any] = {}
    ctx = Context(torch.device("cpu"), cli.CPU, tmp_path, REPO)
    with pytest.raises(CheckFailed, match=r"1\.00e-06 \(losses\).*strict determinism refused"):
        checkpoint_checks.async_checkpoint_resume(ctx, numbers)
    assert tags == ["strict", "warn"]
    assert not torch.are_deterministic_algorithms_enabled()  # the settings came back
    assert "scatter_add_cuda_kernel" in numbers["strict_determinism_error"]
    assert numbers["strict_determinism"] is False
    assert not numbers["losses_bitwise"] and not numbers["weights_bitwise"]
    assert numbers["loss_max_rel_diff"] == pytest.approx(1e-6)


def test_pinned_staging_is_required_on_cuda_only(tmp_path: Path) -> None:
    staging = {
        "staged_bytes": 2**20,
        "pin_requested": False,
        "pinnable_storages": 4,
        "pinned_storages": 0,
    }
    on_cuda = Context(torch.device("cuda", 0), cli.GPU, tmp_path, REPO)  # touches no GPU
    with pytest.raises(CheckFailed, match=r"not page-locked: staging 1\.0 MiB, pinning off"):
        checkpoint_checks.check_pinned(on_cuda, staging)
    checkpoint_checks.check_pinned(on_cuda, {**staging, "pin_requested": True})
    # DCP's internals moved: not observable, not a failure
    checkpoint_checks.check_pinned(on_cuda, None)
    checkpoint_checks.check_pinned(Context(torch.device("cpu"), cli.CPU, tmp_path, REPO), staging)


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
