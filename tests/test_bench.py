"""`dist-train bench`: statistics and JSON output (unit), and a smoke run of every benchmark at
tiny sizes that checks every field is there. Never a timing assertion."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.bench.harness import BenchArgs, measure_interleaved
from dist_train.bench.registry import (
    BENCHMARKS,
    get_benchmark,
    load_runner,
    make_args,
    split_config,
)
from dist_train.bench.report import BenchReport, Column, format_table, timing_rows, write_json
from dist_train.bench.stats import (
    interleaved_order,
    median,
    paired_ratios,
    quantile,
    ratio_summary,
    round_medians,
    summarize,
)
from dist_train.cli.main import build_parser
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv

from conftest import REPO, cli

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TINY = (
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=16",
    "data.max_chars=20000",
)
CPU1 = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")


# --- statistics -------------------------------------------------------------------------------


def test_quantiles_interpolate_like_numpy() -> None:
    xs = [7.0, 1.0, 3.0, 5.0]
    assert median(xs) == 4.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 7.0
    assert quantile(xs, 0.25) == pytest.approx(2.5)  # numpy.percentile(xs, 25)
    assert quantile([4.0], 0.75) == 4.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_summary_is_robust_to_one_outlier() -> None:
    s = summarize([1.0, 1.0, 1.1, 0.9, 100.0])
    assert s["median"] == 1.0 and s["min"] == 0.9 and s["max"] == 100.0 and s["n"] == 5
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and s["iqr"] == pytest.approx(0.1)
    assert s["mean"] > 20  # the mean moves, the median does not


def test_round_figure_is_the_median_of_its_steps() -> None:
    assert round_medians([[1.0, 9.0, 2.0], [3.0, 3.0]]) == [2.0, 3.0]


def test_ratios_are_paired_per_round() -> None:
    a, b = [2.0, 4.0, 9.0], [1.0, 2.0, 3.0]
    assert paired_ratios(a, b) == [2.0, 2.0, 3.0]
    r = ratio_summary(a, b)
    assert r["median"] == 2.0 and r["per_round"] == [2.0, 2.0, 3.0]
    assert r["ratio_of_medians"] == 2.0 and r["min"] == 2.0 and r["max"] == 3.0
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_order_rotates_so_no_contender_always_goes_first() -> None:
    assert interleaved_order(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    rounds = interleaved_order(["a", "b", "c"], 6)
    for position in range(3):
        firsts = [r[position] for r in rounds]
        assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]


def test_measure_interleaved_warms_up_then_alternates() -> None:
    calls: list[tuple[str, int]] = []
    runners = {name: (lambda n, name=name: calls.append((name, n))) for name in ("a", "b")}
    args = BenchArgs("t", None, steps=3, warmup=2, repeats=3)
    times = measure_interleaved(runners, args, CPU1)
    # On CPU every step is timed on its own: a list of `steps` times per round.
    assert calls[:2] == [("a", 2), ("b", 2)] and len(calls) == 2 + 3 * 2 * 3
    assert all(n == 1 for _, n in calls[2:])
    assert [name for name, _ in calls[2::3]] == ["a", "b", "b", "a", "a", "b"]
    assert {k: [len(r) for r in v] for k, v in times.items()} == {"a": [3] * 3, "b": [3] * 3}
    assert all(t >= 0 for v in times.values() for r in v for t in r)


# --- report and JSON -------------------------------------------------------------------------


def _report() -> BenchReport:
    # Two steps per round; a round's figure is the median of its steps.
    times = {
        "x": [[0.010, 0.010], [0.011, 0.013], [0.011, 0.011]],
        "y": [[0.010, 0.010], [0.009, 0.011], [0.010, 0.010]],
    }
    rows = timing_rows(times, {"x": 16, "y": 16}, tokens_per_sample=64)
    return BenchReport(
        "demo",
        {"nan": float("nan"), "nested": {"inf": float("inf")}},
        rows,
        [Column("step_time_s.median", "step ms", 1e3, ".2f")],
        ratios={"x/y": ratio_summary(round_medians(times["x"]), round_medians(times["y"]))},
        notes=["a note"],
    )


def test_json_holds_every_raw_figure_and_is_strict(tmp_path: Path) -> None:
    path = write_json(_report(), tmp_path / "sub" / "demo.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite -> null
    data = json.loads(text)
    assert data["benchmark"] == "demo" and data["notes"] == ["a note"]
    assert data["settings"] == {"nan": None, "nested": {"inf": None}}
    x = data["results"][0]
    assert x["step_times_s"] == [[0.010, 0.010], [0.011, 0.013], [0.011, 0.011]]
    assert x["step_time_s_per_round"] == pytest.approx([0.010, 0.012, 0.011])
    assert x["step_time_s"]["median"] == pytest.approx(0.011)
    assert x["samples_per_sec"]["median"] == pytest.approx(16 / 0.011)
    assert x["tokens_per_sec"]["median"] == pytest.approx(64 * 16 / 0.011)
    assert data["ratios"]["x/y"]["per_round"] == pytest.approx([1.0, 1.2, 1.1])


def test_table_shows_contenders_and_ratios() -> None:
    table = format_table(_report())
    assert "bench demo" in table and "11.00" in table and "x/y: 1.100" in table
    assert table.splitlines()[-1] == "a note"


# --- command line ----------------------------------------------------------------------------


def test_registry_and_parser() -> None:
    names = [b.name for b in BENCHMARKS]
    assert names == [
        "overhead",
        "accelerate",
        "allreduce",
        "scaling",
        "strategies",
        "data",
        "checkpoint",
    ]
    assert all(callable(load_runner(b)) for b in BENCHMARKS)
    with pytest.raises(ConfigError):
        get_benchmark("nope")
    args = build_parser().parse_args(["bench", "allreduce", "--steps", "3", "x.yaml", "a=1"])
    assert (args.bench.name, args.nproc, args.steps, args.overrides) == (
        "allreduce",
        2,
        3,
        ["x.yaml", "a=1"],
    )
    assert split_config(["a=1", "cfg.yaml", "b=2"]) == ("cfg.yaml", ["a=1", "b=2"])
    assert split_config(["a=1"])[0] == QUICKSTART
    with pytest.raises(ConfigError):
        split_config(["one.yaml", "two.yaml"])


@pytest.mark.parametrize(
    ("argv", "key"),
    [
        (["bench", "allreduce", "--nproc", "1"], "--nproc"),
        (["bench", "overhead", "--steps", "0"], "--steps"),
        (["bench", "overhead", "model.n_layers=2"], "model.n_layers"),
        (
            ["bench", "overhead", "train.global_batch_size=15", "--nproc", "2"],
            "train.global_batch_size",
        ),
        (["bench", "accelerate", "--nproc", "2", "parallel.strategy=fsdp"], "parallel.strategy"),
        (["bench", "accelerate", "precision.dtype=fp16", "train.device=cpu"], "precision.dtype"),
    ],
)
def test_input_errors_surface_in_the_parent(argv: list[str], key: str) -> None:
    args = build_parser().parse_args(argv)
    with pytest.raises(ConfigError) as e:
        args.func(args)
    assert e.value.key == key


def test_overhead_takes_fsdp_and_accelerate_does_not() -> None:
    """`bench overhead parallel.strategy=fsdp` passes the parent's checks (the hand-written
    loop has an FSDP2 form); Accelerate's loop stays plain DDP."""
    ns = build_parser().parse_args(["bench", "overhead", "parallel.strategy=fsdp", "--nproc", "2"])
    args, cfg = make_args(ns)
    assert (args.nproc, cfg.parallel.strategy) == (2, "fsdp")
    ns = build_parser().parse_args(
        ["bench", "accelerate", "parallel.strategy=fsdp", "--nproc", "2"]
    )
    with pytest.raises(ConfigError, match="plain DDP loops"):
        make_args(ns)


def test_missing_optional_extra_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate is an optional extra: without it, `bench accelerate` names the extra."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "accelerate" else real(name, *a),
    )
    args = build_parser().parse_args(["bench", "accelerate"])
    with pytest.raises(ConfigError, match=r"pip install 'dist-train\[accelerate\]'") as e:
        args.func(args)
    assert e.value.key == "bench"


# --- smoke runs: every field present, positive and finite (no timing assertions) -----------


def _finite_positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def smoke(name: str, nproc: int, *overrides: str) -> dict[str, Any]:
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
            _finite_positive(ratio[k])
            for k in ("median", "q1", "q3", "min", "max", "ratio_of_medians")
        ), label
        assert len(ratio["per_round"]) == 2
    return data


def check_training(data: dict[str, Any], names: list[str]) -> None:
    assert [r["name"] for r in data["results"]] == names
    for row in data["results"]:
        for key in ("step_time_s", "samples_per_sec", "tokens_per_sec"):
            assert all(_finite_positive(row[key][k]) for k in ("median", "q1", "q3", "min", "max"))
        assert [len(r) for r in row["step_times_s"]] == [2, 2]  # rounds x steps
    assert len(data["ratios"]) == 1
    for key in ("parameters", "global_batch_size", "micro_batch_size", "tokens_per_sample"):
        assert _finite_positive(data["settings"][key]), key


def check_host_syncs(data: dict[str, Any], other: str) -> None:
    """No per-step host sync in dist_train's hot path that the other loop does not have."""
    syncs = data["settings"]["host_syncs_per_step"]
    assert syncs["dist_train"] <= syncs[other], syncs


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
            assert _finite_positive(row[key]["median"]), (row["name"], key)
        assert 0 < row["of_peak"] <= 1
    assert _finite_positive(data["settings"]["gradient_bytes"])


@pytest.mark.distributed
def test_smoke_scaling() -> None:
    data = smoke("scaling", 2)
    check_training(data, ["1 worker", "2 workers"])
    assert [r["samples_per_step"] for r in data["results"]] == [16, 32]


@pytest.mark.slow
def test_cli_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "o.json"
    proc = cli(
        "bench",
        "overhead",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "2",
        "--out",
        str(out),
        *TINY,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step time dist_train/raw_torch:" in proc.stdout and str(out) in proc.stdout
    assert json.loads(out.read_text())["benchmark"] == "overhead"
    bad = cli("bench", "allreduce", "--nproc", "1", *TINY)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --nproc=1")


# --- bench strategies ------------------------------------------------------------------------

STRATEGY_ROWS = [f"{s} {d}" for s in ("ddp", "fsdp", "none") for d in ("fp32", "bf16", "fp16")]


def test_strategies_is_registered_and_refuses_compression() -> None:
    bench = get_benchmark("strategies")
    assert (bench.nproc, bench.min_nproc) == (2, 2) and callable(load_runner(bench))
    for argv, key in (
        (["bench", "strategies", "parallel.grad_compression=bf16"], "parallel.grad_compression"),
        (["bench", "strategies", "--nproc", "1"], "--nproc"),
    ):
        args = build_parser().parse_args(argv)
        with pytest.raises(ConfigError) as e:
            args.func(args)
        assert e.value.key == key


def test_strategies_counts_local_tensor_bytes() -> None:
    from dist_train.bench.strategies import _bucket_bytes, _grad_bytes, _optim_bytes

    model = torch.nn.Linear(10, 4)  # 44 fp32 parameters: 176 bytes
    opt = torch.optim.AdamW(model.parameters())
    assert _grad_bytes(opt) == 0 and _optim_bytes(opt) == 0  # nothing before the first step
    model(torch.randn(3, 10)).sum().backward()
    assert _grad_bytes(opt) == 176
    opt.step()
    # Two moments per parameter, plus Adam's scalar step counter per tensor.
    assert _optim_bytes(opt) == 2 * 176 + 2 * torch.zeros(()).element_size()
    assert _bucket_bytes(model) == 0  # only DDP keeps buckets


@pytest.mark.distributed
def test_smoke_strategies() -> None:
    data = smoke("strategies", 2)
    assert [r["name"] for r in data["results"]] == STRATEGY_ROWS
    rows = {r["name"]: r for r in data["results"]}
    for name, row in rows.items():
        workers = 1 if name.startswith("none") else 2
        assert (row["workers"], row["samples_per_step"]) == (workers, 16), name
        for key in ("step_time_s", "samples_per_sec", "tokens_per_sec", "step_time_vs_base"):
            assert all(_finite_positive(row[key][k]) for k in ("median", "q1", "q3", "min", "max"))
        assert [len(r) for r in row["step_times_s"]] == [2, 2]  # rounds x steps
        assert len(row["step_time_vs_base"]["per_round"]) == 2
        assert _finite_positive(row["state_bytes"]) and _finite_positive(row["state_vs_base"])
        assert len(row["memory_per_rank"]) == workers  # `none` lives on rank 0 only
        for rank in row["memory_per_rank"]:
            assert all(
                _finite_positive(rank[k])
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
        assert _finite_positive(data["settings"][key]), key


# --- bench checkpoint ------------------------------------------------------------------------

CKPT_PARAMS = "300000"  # 1.2 MB of state: every phase takes milliseconds
CKPT_ROWS = [
    "dcp save (sync)",
    "dcp async save: blocking",
    "dcp async save: total",
    "raw write+fsync (new file)",
    "raw write+fsync (in place)",
    "torch.save+fsync (new file)",
    "memcopy (clone)",
    "memcopy (into buffer)",
    "dcp load",
    "checksum verify (after a load)",
    "torch.load",
    "torch.load+load_state_dict",
    "raw read",
    "slow dcp save (sync)",
    "slow dcp async save: blocking",
    "slow dcp async save: total",
    "train",
    "train + bg save",
]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "abc"),
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "0"),
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "1e15"),
        ("DIST_TRAIN_BENCH_CKPT_SLOW_MBPS", "-5"),
    ],
)
def test_checkpoint_sizes_are_checked_in_the_parent(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    bench = get_benchmark("checkpoint")
    assert (bench.nproc, bench.steps) == (1, 1) and callable(load_runner(bench))
    monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["bench", "checkpoint"])
    with pytest.raises(ConfigError) as e:  # 1e15 parameters: more memory than the machine
        args.func(args)
    assert e.value.key == name


def test_checkpoint_state_is_sized_by_parameters() -> None:
    from dist_train.bench.ckpt_io import linear_stack

    assert sum(p.numel() for p in linear_stack(10**8).parameters()) == 24 * 2048**2
    small = linear_stack(300_000)
    assert len(small) == 1 and small[0].weight.shape == (547, 547)


def test_throttled_stream_paces_writes() -> None:
    import io

    from dist_train.bench.ckpt_io import ThrottledStream

    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    buf = io.BytesIO()
    stream = ThrottledStream(buf, rate=100.0, clock=lambda: now[0], sleep=sleep)
    assert stream.write(b"x" * 50) == 50 and sum(slept) == pytest.approx(0.5)
    now[0] += 2.0  # busy elsewhere: the next 100 bytes were due at 1.5 s already
    stream.write(b"y" * 100)
    assert sum(slept) == pytest.approx(0.5)
    stream.write(memoryview(torch.zeros(100).numpy()))  # counted in bytes (400), not items
    assert sum(slept) == pytest.approx(0.5 + 3.0) and stream.tell() == 550 == stream.written


def test_throttle_patches_dcp_writes_under_its_root_only(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    from dist_train.bench.ckpt_io import ThrottledStream, throttle_dcp_writes

    fs, slow = FileSystem(), tmp_path / "slow"
    slow.mkdir()
    with throttle_dcp_writes(slow, 1e12):
        with fs.create_stream(slow / "a", "wb") as s:
            assert isinstance(s, ThrottledStream)
            s.write(b"abc")
        for path, mode in ((tmp_path / "b", "wb"), (slow / "a", "rb")):
            with fs.create_stream(path, mode) as s:
                assert not isinstance(s, ThrottledStream)
    assert (slow / "a").read_bytes() == b"abc"
    with fs.create_stream(slow / "c", "wb") as s:  # restored on exit
        assert not isinstance(s, ThrottledStream)


def test_plain_files_round_trip_retention_and_split_shares(tmp_path: Path) -> None:
    from dist_train.bench.ckpt_io import PlainFiles

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 3, bias=False) for _ in range(3)))
    tensors = {k: t.detach().clone() for k, t in model.state_dict().items()}
    files = PlainFiles(tmp_path, model, CPU1, keep=2)
    for _ in range(3):  # new files each save; only the newest `keep` stay
        files.raw_write()
        files.torch_save()
    files.raw_write(in_place=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "inplace_rank0.bin",
        "pt_rank0_000003.bin",
        "pt_rank0_000005.bin",
        "raw_rank0_000002.bin",
        "raw_rank0_000004.bin",
    ]
    files.raw_read()  # the newest raw file
    flat = torch.cat([tensors[k].flatten() for k in sorted(tensors)])
    assert torch.equal(files.scratch.view(torch.float32), flat)  # the share is sorted by name
    files.torch_load()
    assert all(torch.equal(files._held[0][k], t) for k, t in tensors.items())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    files.torch_load(into_model=True)  # what a resume does: back into the model
    assert all(torch.equal(model.state_dict()[k], t) for k, t in tensors.items())
    files.release()
    files.copy_into_buffer()
    assert files.bytes_written() == {
        "raw": 3 * 12 * 4,
        "torch.save": files.path("pt", 0).stat().st_size,
    }
    second = PlainFiles(tmp_path, model, DistEnv(1, 1, 2, 2, torch.device("cpu"), "gloo"))
    assert list(second.share) == ["1.weight"]  # rank 1 of 2 writes every other tensor


def smoke_checkpoint(monkeypatch: pytest.MonkeyPatch, nproc: int) -> dict[str, Any]:
    """--steps 1 --warmup 0 --repeats 2: loads still find files to read (written first)."""
    monkeypatch.setenv("DIST_TRAIN_BENCH_CKPT_PARAMS", CKPT_PARAMS)
    args = BenchArgs(
        "checkpoint", QUICKSTART, TINY, nproc=nproc, steps=1, warmup=0, repeats=2, threads=1
    )
    report = load_runner(get_benchmark("checkpoint"))(args)
    data = report.to_json()
    assert format_table(report).startswith("== bench checkpoint ==")
    assert [r["name"] for r in data["results"]] == CKPT_ROWS
    for row in data["results"]:
        assert all(_finite_positive(row["time_s"][k]) for k in ("median", "q1", "q3", "min"))
        assert len(row["time_s_per_round"]) == 2
        assert (row["rate"] == "") == ("blocking" in row["name"])  # a rate for all but these
        for key in ("GBps", "steps_per_sec"):
            if key in row:
                assert _finite_positive(row[key]["median"]), (row["name"], key)
    assert len(data["ratios"]) == 10  # 5 targets, 4 references, the checksum cost
    for label, ratio in data["ratios"].items():
        assert all(_finite_positive(ratio[k]) for k in ("median", "q1", "q3", "ratio_of_medians"))
        assert len(ratio["per_round"]) == 2, label
    s = data["settings"]
    assert (s["world_size"], s["threads"], s["args"]["nproc"]) == (nproc, 1, nproc)
    assert s["raw_bytes_written"] == s["state_bytes"] == 4 * s["params"]
    assert s["dcp_bytes_written"] > s["state_bytes"] < s["torch_save_bytes_written"]
    assert s["train_window_steps"] >= 2 and s["slow_state_bytes"] <= s["state_bytes"]
    assert data["notes"][-1].startswith("targets")
    return data


def test_smoke_checkpoint_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    data = smoke_checkpoint(monkeypatch, 1)
    assert list(data["settings"]["dcp_files_bytes"]).count("__0_0.distcp") == 1


@pytest.mark.distributed
def test_smoke_checkpoint_two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    data = smoke_checkpoint(monkeypatch, 2)
    files = set(data["settings"]["dcp_files_bytes"])
    assert {"rng/rank_0.pt", "rng/rank_1.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= files


def test_smoke_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three contenders on a cheap version of the costly dataset; the same batches and work."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    tiny = ("data.kwargs.work=200", "data.kwargs.n=256", "model.kwargs.hidden=64")
    args = BenchArgs("data", None, tiny, nproc=1, steps=2, warmup=1, repeats=2, threads=1)
    data = load_runner(get_benchmark("data"))(args).to_json()
    names = ["dist_train", "raw_torch", "dist_train num_workers=0"]
    assert [r["name"] for r in data["results"]] == names
    assert len(data["ratios"]) == 2
    assert all(_finite_positive(r["median"]) for r in data["ratios"].values())
    assert data["settings"]["num_workers"] == 2 and data["settings"]["sample_work"] == 200
    assert data["settings"]["max_param_diff"] < 1e-5  # the hand-written loop did the same work


def test_data_bench_needs_loading_workers() -> None:
    args = BenchArgs("data", None, ("data.num_workers=0",), nproc=1, steps=1, warmup=0, repeats=1)
    with pytest.raises(ConfigError, match=r"data\.num_workers"):
        load_runner(get_benchmark("data"))(args)
