"""Smoke runs of the `dist-train bench` training benchmarks (overhead, accelerate, allreduce,
scaling, strategies, data) at tiny sizes: every field present, positive and finite. Never a
timing assertion."""

from __future__ import annotations

import pytest

from dist_train.bench.harness import BenchArgs
from dist_train.bench.registry import get_benchmark, load_runner
from dist_train.bench.report import BenchReport, format_table

from helpers_bench import check_host_syncs, check_training, finite_positive, smoke


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


STRATEGY_ROWS = [f"{s} {d}" for s in ("ddp", "fsdp", "none") for d in ("fp32", "bf16", "fp16")]


@pytest.mark.distributed
def test_smoke_strategies() -> None:
    data = smoke("strategies", 2)
    assert [r["name"] for r in data["results"]] == STRATEGY_ROWS
    rows = {r["name"]: r for r in data["results"]}
    for name, row in rows.items():
        workers = 1 if name.startswith("none") else 2
        assert (row["workers"], row["samples_per_step"]) == (workers, 16), name
        for key in ("step_time_s", "samples_per_sec", "tokens_per_sec", "step_time_vs_base"):
            assert all(finite_positive(row[key][k]) for k in ("median", "q1", "q3", "min", "max"))
        assert [len(r) for r in row["step_times_s"]] == [2, 2]  # rounds x steps
        assert len(row["step_time_vs_base"]["per_round"]) == 2
        assert finite_positive(row["state_bytes"]) and finite_positive(row["state_vs_base"])
        assert len(row["memory_per_rank"]) == workers  # `none` lives on rank 0 only
        for rank in row["memory_per_rank"]:
            assert all(
                finite_positive(rank[k])
                for k in ("params_bytes", "grads_bytes", "optim_bytes", "state_bytes")
            )
            assert rank["cuda_peak_bytes"] is None  # CPU: no allocator statistics
            assert (rank["ddp_bucket_bytes"] > 0) == name.startswith("ddp")
    assert rows["ddp fp32"]["step_time_vs_base"]["per_round"] == [1.0, 1.0]
    for dtype in ("fp32", "bf16", "fp16"):
        ddp, fsdp, none = (rows[f"{s} {dtype}"] for s in ("ddp", "fsdp", "none"))
        assert fsdp["state_bytes"] < ddp["state_bytes"]  # sharded over 2 ranks
        # Parameters: FSDP holds about half (shards of uneven tensors may round up).
        params = [r["memory_per_rank"][0]["params_bytes"] for r in (ddp, fsdp, none)]
        assert params[0] == params[2] and params[1] <= 0.6 * params[0]
    assert data["settings"]["dtypes"] == ["fp32", "bf16", "fp16"]
    for key in ("parameters", "global_batch_size", "micro_batch_size", "tokens_per_sample"):
        assert finite_positive(data["settings"][key]), key


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
