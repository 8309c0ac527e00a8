"""Shared test helpers: run a function on N gloo ranks, drive the real CLI, keep the env clean."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CLI = Path(sys.executable).parent / "dist-train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str,
               args: tuple[Any, ...]) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        result = fn(*args)
    except BaseException:
        Path(out, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out, f"rank{rank}.pt"))


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any,
                 timeout: float = 180.0) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned processes with torchrun's environment variables
    set; return each rank's result. A rank that fails or hangs fails the test (no leftovers)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out, args))
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [Path(out, f"error{r}.txt") for r in range(world_size)]
        messages = [e.read_text() for e in errors if e.exists()]
        codes = [p.exitcode for p in procs]
        if messages or any(codes):
            raise AssertionError(f"ranks exited {codes}\n" + "\n".join(messages))
        return [torch.load(Path(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def cli(*args: str, cwd: Path = REPO, timeout: float = 300.0,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The installed `dist-train` script, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(TESTS), **(env or {})}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        full_env.pop(var, None)
    return subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=full_env, stdin=subprocess.DEVNULL)


@pytest.fixture(autouse=True)
def clean_dist_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No test sees another's torchrun variables or process group."""
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(var, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


# Small GPT settings shared by tests that train: seconds, not minutes, on 2 cores.
TINY_GPT = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=32",
            "data.max_chars=100000", "train.eval_batches=2", "log.progress=never"]
