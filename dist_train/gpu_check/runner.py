"""Running named checks one by one: timing, pass/fail/skip, and the JSON report.

A check fills `numbers` as it measures, so a failure keeps whatever it had measured so far.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import dist_train

PASS, FAIL, SKIP, PENDING = "pass", "fail", "skip", "pending"


class CheckFailed(Exception):
    """The check ran and found something wrong; the message is the report's error line."""


class CheckSkipped(Exception):
    """The check cannot run here; the message says why."""


@dataclass(frozen=True)
class Sizes:
    """How much work each check does: real sizes on a GPU, tiny ones for `--device cpu`."""

    train_steps: int  # train_bf16 / train_fp16
    compile_steps: int
    resume_every: int  # K: the cut run stops at K, the uninterrupted one runs 2K
    export_steps: int
    warmup_steps: int  # throughput: untimed, the first one compiles
    timed_steps: int
    model: tuple[str, ...]  # overrides added to the quickstart config of every training check
    big_model: tuple[str, ...]  # overrides of the throughput model (and its batch)
    compile_big: bool

    def scaled(self, factor: float) -> Sizes:
        """Step counts times `factor`, each kept at the least that still tests something
        (below 20 steps the loss of the quickstart model may not yet fall by 10%)."""

        def n(steps: int, least: int) -> int:
            return max(least, round(steps * factor))

        return replace(
            self,
            train_steps=n(self.train_steps, 20),
            compile_steps=n(self.compile_steps, 20),
            resume_every=n(self.resume_every, 2),
            export_steps=n(self.export_steps, 2),
            timed_steps=n(self.timed_steps, 2),
        )


@dataclass(frozen=True)
class Context:
    device: torch.device
    sizes: Sizes
    work_dir: Path  # run directories and exported files; deleted at the end
    repo: Path  # the folder holding dist_train/ (and tests/, configs/ in a checkout)


CheckFn = Callable[[Context, dict[str, Any]], str]  # fills numbers, returns a summary line


@dataclass(frozen=True)
class Check:
    name: str
    description: str
    fn: CheckFn


@dataclass
class CheckResult:
    name: str
    description: str
    status: str = PENDING
    duration_s: float = 0.0
    summary: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None  # skip
    error: str | None = None  # fail: one line
    traceback: str | None = None  # fail: the last frames, for whoever reads the JSON later


def error_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    text = lines[0] if lines else ""
    if not isinstance(error, CheckFailed):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:400]


def run_check(check: Check, ctx: Context) -> CheckResult:
    """Run one check; whatever it raises makes it fail, never stops the run."""
    result = CheckResult(check.name, check.description)
    start = time.perf_counter()
    try:
        result.summary = check.fn(ctx, result.numbers)
        result.status = PASS
    except CheckSkipped as e:
        result.status, result.reason = SKIP, str(e)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        result.status, result.error = FAIL, error_line(e)
        result.traceback = "".join(traceback.format_exc().splitlines(keepends=True)[-30:])
    finally:
        result.duration_s = round(time.perf_counter() - start, 3)
    try:
        release(ctx.device)
    except Exception as e:  # e.g. a sticky CUDA error: recorded, and the next check runs
        result.numbers["cleanup_error"] = error_line(e)
    return result


def release(device: torch.device) -> None:
    """Leave nothing behind for the next check: process group, compiled graphs, memory."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if "torch._dynamo" in sys.modules:
        sys.modules["torch._dynamo"].reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_tool(
    cmd: list[str], what: str, timeout_s: float, cwd: Path | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """A command run as a user runs it, output captured, no stdin, with this process's
    environment less torchrun's variables (the tool sets its own: they are not ours to pass
    on) plus `env`. Running out of time fails the check."""
    torchrun = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")
    full_env = {k: v for k, v in os.environ.items() if k not in torchrun} | env
    try:
        return subprocess.run(
            cmd,
            cwd=cwd,
            capture_output=True,
            text=True,
            env=full_env,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"{what} did not finish in {timeout_s:g} s") from None


def environment(device: str) -> dict[str, Any]:
    """Versions and the GPU; asks CUDA for properties only when it is there."""
    info: dict[str, Any] = {
        "dist_train_version": dist_train.__version__,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "mode": device,
        "cuda_available": torch.cuda.is_available(),
        "device_count": 0,
        "device_name": None,
        "total_memory_bytes": None,
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    }
    if info["cuda_available"]:
        try:
            info.update(cuda_properties())
        except Exception as e:  # a broken driver still gets its report, with the reason
            info["cuda_error"] = error_line(e)
    return info


def cuda_properties() -> dict[str, Any]:
    from dist_train.config.schema import LogConfig
    from dist_train.track.metrics import peak_flops

    props = torch.cuda.get_device_properties(0)
    peak = peak_flops(LogConfig(), torch.device("cuda", 0), "bf16")
    nccl = torch.cuda.nccl.version()  # a tuple; an int in older torch builds
    return {
        "device_count": torch.cuda.device_count(),
        "device_name": props.name,
        "total_memory_bytes": props.total_memory,
        "compute_capability": f"{props.major}.{props.minor}",
        "cudnn_version": torch.backends.cudnn.version(),
        "nccl_version": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
        "peak_bf16_tflops": peak / 1e12 if peak else None,
    }


def write_report(
    path: Path,
    env: dict[str, Any],
    results: list[CheckResult],
    wall_s: float,
    exit_status: int | None,
) -> None:
    """Atomic: a reader (or a run killed mid-way) never sees half a file."""
    status = "running" if exit_status is None else {0: PASS, 3: "no_cuda"}.get(exit_status, FAIL)
    data = {
        "status": status,
        "exit_status": exit_status,
        "wall_s": round(wall_s, 3),
        **env,
        "checks": {r.name: asdict(r) for r in results},
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
