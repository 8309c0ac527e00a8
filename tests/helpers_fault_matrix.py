"""Shared by the fault matrix: the tiny run, `dist-train` in a forked child of the test process
(torch is loaded already: no interpreter start-up per run), and what a finished run must hold."""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch._dynamo  # what every run loads (its optimizer): once, not per child
import torch.distributed.run  # the launcher's agent

import dist_train.cli.main
import dist_train.train.build  # noqa: F401
from dist_train.checkpoint.export import read_checkpoint_weights
from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.launch.faults import FAULT_ENV

from conftest import REPO, TESTS

STEPS, LOG_EVERY, EVAL_EVERY, SAVE_EVERY = 12, 1, 4, 4
# An MLP on synthetic data: about a millisecond a step; SGD with momentum, so the optimizer has
# state to save and restore. Every step logged, evaluation and a checkpoint every 4 steps, only
# the newest kept (every commit after the first deletes one: retention), no dropout.
RUN = [
    "train",
    "configs/mlp_synthetic.yaml",
    "train.device=cpu",
    "log.progress=never",
    "model.hidden_dims=[16]",
    "model.dropout=0.0",
    "data.num_samples=512",
    "train.global_batch_size=16",
    "train.micro_batch_size=8",
    "train.eval_batches=1",
    f"train.max_steps={STEPS}",
    f"log.every_steps={LOG_EVERY}",
    f"train.eval_every={EVAL_EVERY}",
    f"checkpoint.every_steps={SAVE_EVERY}",
    "checkpoint.keep_last=1",
]
HANG_GUARD_S = 300.0


def run_forked(args: list[str], run_dir: Path, fault: str | None = None) -> tuple[int, str]:
    """`dist-train ARGS train.run_dir=RUN_DIR` (a single process, or the launcher of `--nproc
    N`) in a forked child, with DIST_TRAIN_FAULT=`fault`; its exit status (negative: the signal
    that killed it) and its output. The child starts from the repository root, so relative
    config paths resolve; workers run this checkout."""
    log = run_dir.with_name(run_dir.name + f".{time.monotonic_ns()}.log")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        _child([*args, f"train.run_dir={run_dir}"], fault, log)
    deadline = time.monotonic() + HANG_GUARD_S
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status), log.read_text(errors="replace")
        if time.monotonic() > deadline:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"hung: {args} ({fault})\n{log.read_text()[-3000:]}")
        time.sleep(0.02)


def _child(args: list[str], fault: str | None, log: Path) -> None:
    code = 1
    try:
        gc.freeze()  # the test process's objects: never collected here (a run calls gc.collect)
        os.setpgid(0, 0)  # its own group: the hang guard ends its workers with it
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(REPO)
        os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS)])  # for workers
        for var in (FAULT_ENV, "OMP_NUM_THREADS"):  # the launcher picks workers' threads
            os.environ.pop(var, None)
        if fault is not None:
            os.environ[FAULT_ENV] = fault
        torch.set_num_threads(1)  # one thread, as each of 2 workers on 2 cores
        from dist_train.cli.main import main

        try:
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's weights in the run's newest checkpoint, which must be at the last step."""
    newest = complete_checkpoints(run_dir / "checkpoints")[-1]
    manifest = read_manifest(newest)
    assert manifest["step"] == STEPS, newest
    return read_checkpoint_weights(newest, manifest, str(newest), "test")


def record_lines(run_dir: Path) -> set[str]:
    """Every metrics record the run directory keeps, wherever it was set aside."""
    files = [
        run_dir / "metrics.jsonl",
        run_dir / "metrics.discarded.jsonl",
        *run_dir.glob("previous/*/metrics*.jsonl"),
    ]
    return {line for f in files if f.exists() for line in f.read_text().splitlines()}


def check_finished(run_dir: Path, baseline: dict[str, Any], kept: set[str]) -> None:
    """A finished run of one lineage: bitwise the uninterrupted run's final weights and losses,
    one record per logged and per evaluated step, every record `kept` before still somewhere
    (moved aside is fine), no debris among the checkpoints, no lock."""
    weights = final_weights(run_dir)
    assert weights.keys() == baseline["weights"].keys()
    for name, tensor in baseline["weights"].items():
        assert torch.equal(weights[name], tensor), name
    found = records(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in found if "loss" in r]
    val = [(r["step"], r["val/loss"]) for r in found if "val/loss" in r]
    assert train == baseline["train"]  # each step once, in order, with the same loss
    assert val == baseline["val"]
    assert not kept - record_lines(run_dir), "records of the attempt cut short were lost"
    assert (run_dir / "config.yaml").is_file()
    left = [p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]
    assert left == [] and not (run_dir / ".lock").exists()


def baseline_of(run_dir: Path) -> dict[str, Any]:
    """What an uninterrupted run left: its final weights, its losses and val losses by step."""
    found = records(run_dir / "metrics.jsonl")
    train = [(r["step"], r["loss"]) for r in found if "loss" in r]
    val = [(r["step"], r["val/loss"]) for r in found if "val/loss" in r]
    assert [s for s, _ in train] == list(range(1, STEPS + 1))
    assert [s for s, _ in val] == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    return {"weights": final_weights(run_dir), "train": train, "val": val}
