"""The checks, in the order they run (CHECKS), and those of the machine itself: the
repository's gpu tests and a one-rank NCCL group. Each fills `numbers` as it goes, raises
CheckFailed / CheckSkipped, or returns a one-line summary. With `--device cpu` the same code
runs on tiny sizes (gloo for NCCL). The training checks are in train_checks.py, the checkpoint
and export checks in checkpoint_checks.py, the strategies table in strategy_check.py."""

from __future__ import annotations

import re
import socket
import sys
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dist_train.gpu_check.checkpoint_checks import async_checkpoint_resume, export_check
from dist_train.gpu_check.runner import Check, CheckFailed, CheckSkipped, Context, run_tool
from dist_train.gpu_check.strategy_check import strategies_check
from dist_train.gpu_check.train_checks import (
    compile_check,
    throughput_gpt2_small,
    train_bf16,
    train_fp16,
)

PYTEST_TIMEOUT_S = 240
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("1 passed, 2 skipped, 90 deselected in 3.1s")."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors", "deselected"), 0)
    finals = [line for line in output.splitlines() if COUNT.search(line) and " in " in line]
    for n, word in COUNT.findall(finals[-1] if finals else ""):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def pytest_gpu(ctx: Context, numbers: dict[str, Any]) -> str:
    if not (ctx.repo / "tests").is_dir():
        raise CheckSkipped(f"no tests/ folder next to the package in {ctx.repo}")
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    # no bytecode and no .pytest_cache: leave the checkout as it was
    proc = run_tool(cmd, "pytest -m gpu", PYTEST_TIMEOUT_S, ctx.repo, PYTHONDONTWRITEBYTECODE="1")
    counts = pytest_counts(proc.stdout)
    numbers.update(counts, exit_status=proc.returncode)
    if proc.returncode == 5:  # pytest: no test collected
        raise CheckSkipped("no test in tests/ is marked gpu")
    if proc.returncode or counts["failed"] or counts["errors"]:
        numbers["output_tail"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        first = next(
            (ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))),
            f"pytest exit status {proc.returncode}",
        )
        raise CheckFailed(f"{counts['failed']} failed, {counts['errors']} errors; {first}")
    if ctx.device.type == "cuda" and not counts["passed"]:
        raise CheckFailed(f"no gpu test ran on a GPU machine ({counts['skipped']} skipped)")
    return f"{counts['passed']} passed, {counts['skipped']} skipped"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_init(ctx: Context, numbers: dict[str, Any]) -> str:
    cuda = ctx.device.type == "cuda"
    backend, port = ("nccl" if cuda else "gloo"), free_port()
    numbers.update(backend=backend, port=port)
    if cuda:
        torch.cuda.set_device(ctx.device)
    start = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        **({"device_id": ctx.device} if cuda else {}),
    )
    try:
        numbers["init_s"] = round(time.perf_counter() - start, 3)
        x = torch.arange(1 << 20, dtype=torch.float32, device=ctx.device)
        dist.all_reduce(x)  # a sum over the one rank: the values must come back unchanged
        if cuda:
            torch.cuda.synchronize(ctx.device)
        numbers["all_reduce_s"] = round(time.perf_counter() - start - numbers["init_s"], 3)
        numbers["all_reduce_ok"] = torch.equal(x.cpu(), torch.arange(1 << 20, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    if not numbers["all_reduce_ok"]:
        raise CheckFailed(f"{backend} all_reduce of 2^20 floats over one rank changed the values")
    return f"{backend}: init {numbers['init_s']:.2f} s, all_reduce of 4 MiB correct"


CHECKS = (
    Check("pytest_gpu", "the repository's tests marked gpu (pytest -m gpu)", pytest_gpu),
    Check(
        "nccl_init",
        "one-rank NCCL process group (gloo with --device cpu): init, all_reduce",
        nccl_init,
    ),
    Check("train_bf16", "quickstart GPT in bf16: the loss falls", train_bf16),
    Check("train_fp16", "quickstart GPT in fp16 with the loss scaler: the loss falls", train_fp16),
    Check(
        "compile", "quickstart GPT with train.compile=true (bf16): the loss falls", compile_check
    ),
    Check(
        "async_checkpoint_resume",
        "async saves (pinned staging); stop at K + resume == uninterrupted 2K steps, bitwise",
        async_checkpoint_resume,
    ),
    Check(
        "export",
        "export to .safetensors, load into a fresh model: same weights and outputs",
        export_check,
    ),
    Check(
        "throughput_gpt2_small",
        "GPT-2 small (12x768, context 1024), bf16, compiled: tokens/s and MFU",
        throughput_gpt2_small,
    ),
    Check(
        "strategies",
        "bench strategies on every GPU (one worker each, 2 or more): ddp/zero2/fsdp/hsdp x "
        "activation checkpointing, step time, peak and activation memory vs hand-written loops",
        strategies_check,
    ),
)
