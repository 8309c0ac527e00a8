"""Smoke runs of the `dist-train bench` training benchmarks (overhead, accelerate, allreduce,
scaling, strategies, data) at tiny sizes: every field present, positive and finite; the
strategies table's memory meter and goals on made-up figures. Never a timing assertion."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from dist_train.bench.harness import BenchArgs
from dist_train.bench.memory_meter import MemoryMeter, glibc_in_use
from dist_train.bench.registry import get_benchmark, load_runner
from dist_train.bench.report import BenchReport, format_table
from dist_train.bench.strategy_table import goals, plan_rows, table_rows
from dist_train.config.load import load_config

from helpers_bench import check_host_syncs, check_training, finite_positive, smoke, smoke_report


def test_smoke_overhead_one_worker() -> None:
    data = smoke("overhead", 1)
    check_training(data, ["dist_train", "raw_torch"])
    assert data["settings"]["max_param_diff"] < 1e-5  # the raw loop really does the same work
    check_host_syncs(data, "raw_torch")


def test_smoke_accelerate_one_worker() -> None:
    data = smoke("accelerate", 1)
    check_training(data, ["dist_train", "accelerate"])
    assert data["settings"]["accelerate_distributed_type"] == "DistributedType.NO"


@pytest.mark.distributed
def test_smoke_overhead_two_workers() -> None:
    data = smoke("overhead", 2)
    check_training(data, ["dist_train", "raw_torch"])
    assert data["settings"]["backend"] == "gloo"
    check_host_syncs(data, "raw_torch")


@pytest.mark.distributed
def test_smoke_overhead_fsdp() -> None:
    """Against a hand-written FSDP2 loop, with 2 micro-batches per step (its gradient sync)."""
    data = smoke("overhead", 2, "parallel.strategy=fsdp", "train.micro_batch_size=4")
    check_training(data, ["dist_train", "raw_torch"])
    assert data["settings"]["strategy"] == "fsdp" and data["settings"]["accumulation_steps"] == 2
    assert data["settings"]["max_param_diff"] < 1e-5  # the same work, step for step
    check_host_syncs(data, "raw_torch")
    lines = format_table(BenchReport("overhead", {}, [], [], data["ratios"])).splitlines()
    assert lines[-1].startswith("step time dist_train/raw_torch: ")


@pytest.mark.distributed
def test_smoke_accelerate_two_workers_bf16() -> None:
    data = smoke("accelerate", 2, "precision.dtype=bf16")
    check_training(data, ["dist_train", "accelerate"])
    assert data["settings"]["accelerate_distributed_type"] == "DistributedType.MULTI_CPU"
    assert data["settings"]["precision"] == "bf16"
    check_host_syncs(data, "accelerate")


@pytest.mark.distributed
def test_smoke_allreduce() -> None:
    data = smoke("allreduce", 2)
    sizes = [r["bytes"] for r in data["results"]]
    assert sizes == sorted(sizes) and len(sizes) == 9  # 4 KiB .. 64 MiB + the model's gradients
    for row in data["results"]:
        for key in ("time_s", "algbw_GBps", "busbw_GBps"):
            assert finite_positive(row[key]["median"]), (row["name"], key)
        assert 0 < row["of_peak"] <= 1
    assert finite_positive(data["settings"]["gradient_bytes"])


@pytest.mark.distributed
def test_smoke_scaling() -> None:
    data = smoke("scaling", 2)
    check_training(data, ["1 worker", "2 workers"])
    assert [r["samples_per_step"] for r in data["results"]] == [16, 32]


STRATEGY_ROWS = [n for s in ("ddp", "zero2", "fsdp", "hsdp") for n in (s, f"{s} ac=full")]
STRATEGY_COLUMNS = [
    "step ms",
    "time/ddp",
    "hand ms",
    "time/hand",
    "peak MiB/rank",
    "peak/ddp",
    "act MiB",
    "est MiB/rank",
    "est/peak",
]
MEASURED = "glibc mallinfo2" if glibc_in_use() else None  # musl, macOS: tensor sizes instead


def check_strategy_rows(data: dict[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """Every row: numbers for each ratio and memory figure; its twin did the same work."""
    assert [r["name"] for r in data["results"]] == names
    rows = {r["name"]: r for r in data["results"]}
    for name, row in rows.items():
        for key in ("step_time_s", "hand_step_time_s", "step_time_vs_base", "step_time_vs_hand"):
            assert all(finite_positive(row[key][k]) for k in ("median", "q1", "q3", "min", "max"))
        assert [len(r) for r in row["step_times_s"]] == [2, 2]  # rounds x steps
        assert len(row["step_time_vs_hand"]["per_round"]) == 2
        for key in ("peak_bytes", "peak_vs_base", "estimate_bytes", "estimate_vs_peak"):
            assert finite_positive(row[key]), (name, key)
        assert row["max_param_diff"] < 1e-5, name  # the hand-written loop did the same work
        assert (row["activation_bytes"] is not None) == (MEASURED is not None)
        if row["activation_checkpointing"] != "none":
            assert finite_positive(row["step_time_vs_no_checkpointing"]["median"])
            if MEASURED:  # a memory figure, not a timing: checkpointing keeps less
                assert 0 < row["activation_cut"] <= 1, name
    assert rows[names[0]]["step_time_vs_base"]["per_round"] == [1.0, 1.0]
    assert data["settings"]["memory_source"] == MEASURED
    return rows


@pytest.mark.distributed
def test_smoke_strategies() -> None:
    report = smoke_report("strategies", 2)
    assert [c.header for c in report.columns] == STRATEGY_COLUMNS
    lines = format_table(report).splitlines()
    assert lines[1].split() == ["step", "ms", *" ".join(STRATEGY_COLUMNS[1:]).split()]
    assert [line.split()[0] for line in lines[3:11]] == [n.split()[0] for n in STRATEGY_ROWS]
    data = report.to_json()
    rows = check_strategy_rows(data, STRATEGY_ROWS)
    for name, row in rows.items():
        assert len(row["memory_per_rank"]) == len(row["hand_memory_per_rank"]) == 2
        for rank in row["memory_per_rank"]:
            assert all(finite_positive(rank[k]) for k in ("params_bytes", "optim_bytes"))
            assert (rank["ddp_bucket_bytes"] > 0) == name.startswith("ddp")
    # Parameters (from tensor sizes): the sharded strategies hold about half of DDP's.
    params = {n: r["memory_per_rank"][0]["params_bytes"] for n, r in rows.items()}
    assert all(params[s] <= 0.6 * params["ddp"] for s in ("zero2", "fsdp", "hsdp"))
    goals = data["settings"]["goals"]
    assert list(goals["sharded_peak"]) == ["zero2", "fsdp"]
    assert list(goals["checkpointing"]) == STRATEGY_ROWS[1::2]
    assert list(goals["hand"]) == STRATEGY_ROWS
    assert all(g["met"] in (True, False) for kind in goals.values() for g in kind.values())
    assert sum(line.startswith("goal: ") for line in data["notes"]) == 3
    assert "1 replica(s) x 2 shard(s)" in data["notes"][0]  # hsdp's mesh on one node


def test_smoke_strategies_one_worker() -> None:
    """One worker: `none` with and without checkpointing, the same columns against `none`."""
    report = smoke_report("strategies", 1)
    assert [c.header for c in report.columns][1] == "time/none"
    data = report.to_json()
    check_strategy_rows(data, ["none", "none ac=full"])
    assert data["settings"]["goals"]["sharded_peak"] == {}


def test_memory_meter_sees_a_peak_between_its_reads() -> None:
    """A tensor allocated and freed inside the window shows in its peak, not after it."""
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.available:
        pytest.skip("no glibc mallinfo2 here")
    size = 64 * 2**20
    before = meter.in_use()
    with meter.window() as window:
        x = torch.ones(size // 4)  # fp32
        y = x * 2  # another one, alive with x at the peak
        del x, y
    assert window.peak - before >= 2 * size
    assert abs(meter.in_use() - before) < size / 4  # freed again


def test_strategy_goals_are_computed_from_the_figures() -> None:
    """Two rows of one strategy: the goals follow the measured ratios, not fixed verdicts."""
    rounds = {"fsdp": [[1.0]], "fsdp ac=full": [[1.3]], "fsdp hand": [[1.0]]}
    rounds["fsdp ac=full hand"] = [[1.2]]
    plans = plan_rows(load_config(None, []), 2)[4:6]  # fsdp, fsdp ac=full
    figures = {
        "fsdp": {"peak_bytes": 100, "activation_bytes": 40, "state_bytes": 1},
        "fsdp ac=full": {"peak_bytes": 80, "activation_bytes": 10, "state_bytes": 1},
    }
    figures |= {f"{n} hand": f for n, f in figures.items()}
    result = {
        "rows": [dataclasses.asdict(p) for p in plans],
        "step_times": rounds,
        "memory": [figures],
        "memory_source": "test",
        "estimates": {"fsdp": {"total": 50.0}},
        "max_param_diff": {"fsdp": 0.0, "fsdp ac=full": 0.0},
        "global_batch_size": 4,
        "tokens_per_sample": 8,
        "world_size": 2,
    }
    rows = table_rows(result)
    assert [r["name"] for r in rows] == ["fsdp", "fsdp ac=full"]
    assert rows[1]["activation_cut"] == pytest.approx(0.75)
    assert rows[0]["estimate_vs_peak"] == 0.5 and rows[1]["estimate_bytes"] is None
    g = goals(result, rows)
    assert g["checkpointing"]["fsdp ac=full"]["met"] is True  # -75 % at 1.3x
    assert g["hand"]["fsdp"]["met"] and not g["hand"]["fsdp ac=full"]["met"]  # 1.3 / 1.2
    assert g["sharded_peak"]["fsdp"] == {"peak_vs_ddp": 1.0, "met": False}  # base: fsdp itself


def test_smoke_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three contenders on a cheap version of the costly dataset; the same batches and work."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = ("data.kwargs.work=200", "data.kwargs.n=256", "model.kwargs.hidden=64")
    args = BenchArgs("data", None, tiny, nproc=1, steps=2, warmup=1, repeats=1, threads=1)
    data = load_runner(get_benchmark("data"))(args).to_json()
    names = ["dist_train", "raw_torch", "dist_train num_workers=0"]
    assert [r["name"] for r in data["results"]] == names
    assert len(data["ratios"]) == 2
    assert all(finite_positive(r["median"]) for r in data["ratios"].values())
    assert data["settings"]["num_workers"] == 2 and data["settings"]["sample_work"] == 200
    assert data["settings"]["max_param_diff"] < 1e-5  # the hand-written loop did the same work
