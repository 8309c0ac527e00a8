"""Shared by the fault matrix: the tiny run, `dist-train` in a forked child of the test process
(torch is loaded already: no interpreter start-up per run), and what a finished run must hold."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from dist_train.checkpoint.export import read_checkpoint_weights
from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.launch.faults import FAULT_ENV

from conftest import REPO, TESTS
from helpers_fork import fork_main

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
    N`) in a forked child of this process (`fork_main`), with DIST_TRAIN_FAULT=`fault`; its exit
    status (negative: the signal that killed it) and its output. The child starts from the
    repository root, so relative config paths resolve; workers run this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    for var in (FAULT_ENV, "OMP_NUM_THREADS"):  # the launcher picks workers' threads
        env.pop(var, None)
    if fault is not None:
        env[FAULT_ENV] = fault
    proc = fork_main([*args, f"train.run_dir={run_dir}"], REPO, env, HANG_GUARD_S)
    return proc.returncode, proc.stdout + proc.stderr


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
