"""Shared by the `dist-train bench` tests: the tiny model settings and the smoke-run checks
(every field present, positive and finite; never a timing assertion)."""

from __future__ import annotations

import math
from typing import Any

import torch

from dist_train.bench.harness import BenchArgs
from dist_train.bench.registry import get_benchmark, load_runner
from dist_train.bench.report import BenchReport, format_table
from dist_train.launch.env import DistEnv

from conftest import REPO

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TINY = (
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "data.max_chars=20000",
)
CPU1 = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")


def finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def smoke_report(name: str, nproc: int, *overrides: str) -> BenchReport:
    """The benchmark at tiny sizes (2 rounds of 2 steps), its generic fields checked."""
    args = BenchArgs(
        name, QUICKSTART, (*TINY, *overrides), nproc=nproc, steps=2, warmup=1, repeats=2, threads=1
    )
    report = load_runner(get_benchmark(name))(args)
    data = report.to_json()
    assert data["benchmark"] == name and data["settings"]["args"]["nproc"] == nproc
    assert data["settings"]["threads"] == 1 and data["settings"]["world_size"] == nproc
    assert format_table(report).startswith(f"== bench {name} ==")
    for label, ratio in data["ratios"].items():
        assert all(
            finite_positive(ratio[k])
            for k in ("median", "q1", "q3", "min", "max", "ratio_of_medians")
        ), label
        assert len(ratio["per_round"]) == 2
    return report


def smoke(name: str, nproc: int, *overrides: str) -> dict[str, Any]:
    return smoke_report(name, nproc, *overrides).to_json()


def check_training(data: dict[str, Any], names: list[str]) -> None:
    assert [r["name"] for r in data["results"]] == names
    for row in data["results"]:
        for key in ("step_time_s", "samples_per_sec", "tokens_per_sec"):
            assert all(finite_positive(row[key][k]) for k in ("median", "q1", "q3", "min", "max"))
        assert [len(r) for r in row["step_times_s"]] == [2, 2]  # rounds x steps
    assert len(data["ratios"]) == 1
    for key in ("parameters", "global_batch_size", "micro_batch_size", "tokens_per_sample"):
        assert finite_positive(data["settings"][key]), key


def check_host_syncs(data: dict[str, Any], other: str) -> None:
    """No per-step host sync in dist_train's hot path that the other loop does not have."""
    syncs = data["settings"]["host_syncs_per_step"]
    assert syncs["dist_train"] <= syncs[other], syncs
