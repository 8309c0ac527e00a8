"""`python -m dist_train.gpu_check --device cpu`: real checks on tiny sizes writing a real JSON
report (the strategies table too), and the checkpoint-resume, pinned-staging and strategies
checks' verdicts on what a GPU may do."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from dist_train.data.datasets import DataSpec
from dist_train.gpu_check import checkpoint_checks, cli, strategy_check, train_checks
from dist_train.gpu_check.runner import CheckFailed, CheckSkipped, Context
from dist_train.gpu_check.training import TrainRun

from conftest import REPO
from helpers_gpu_check import gpu_check


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


@pytest.mark.distributed
def test_cpu_run_of_the_strategies_table(tmp_path: Path) -> None:
    """`bench strategies` through the CLI on 2 gloo workers: the table printed, its rows and
    goals in the JSON."""
    proc = gpu_check("--device", "cpu", "--only", "strategies", "--out", "r.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== bench strategies ==" in proc.stdout and "goal: " in proc.stdout
    result = json.loads((tmp_path / "r.json").read_text())["checks"]["strategies"]
    assert result["status"] == "pass", result
    n = result["numbers"]
    assert n["nproc"] == 2 and n["exit_status"] == 0 and "--nproc 2" in n["command"]
    assert list(n["rows"])[:2] == ["ddp", "ddp ac=full"] and len(n["rows"]) == 8
    assert all(row["time_vs_hand"] > 0 and row["peak_mib"] > 0 for row in n["rows"].values())
    assert set(n["goals"]) == {"sharded_peak", "checkpointing", "hand"}
    assert result["summary"].startswith("8 rows on 2 workers; peak/ddp zero2 ")


def test_strategies_check_needs_two_gpus_and_the_cuda_allocator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a GPU machine would do, without touching a GPU: one GPU is a skip (NCCL runs one
    worker per GPU), four make four workers, and memory not read from CUDA's allocator fails."""
    on_cuda = Context(torch.device("cuda", 0), cli.GPU, tmp_path, REPO)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(CheckSkipped, match=r"needs 2 or more GPUs.*\(1 visible\)"):
        strategy_check.strategies_check(on_cuda, {})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert strategy_check.workers(on_cuda) == 4
    cmd = strategy_check.bench_command(on_cuda, 4)
    assert cmd[cmd.index("--nproc") + 1] == "4" and "train.device=cuda" in cmd
    assert "train.global_batch_size=32" in cmd and "precision.dtype=bf16" in cmd
    settings = {"memory_source": "glibc mallinfo2", "goals": {}, "world_size": 4}
    with pytest.raises(CheckFailed, match="not the CUDA allocator"):
        strategy_check.read_table({"settings": settings, "results": []}, True, {})
