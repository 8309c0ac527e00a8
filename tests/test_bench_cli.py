"""`dist-train bench` from the command line: the registry and parser, input errors found in the
parent before any worker starts, a missing optional extra, the strategies and data benchmarks'
own checks, and the real CLI writing its table and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.bench.harness import BenchArgs
from dist_train.bench.registry import (
    BENCHMARKS,
    get_benchmark,
    load_runner,
    make_args,
    split_config,
)
from dist_train.cli.main import build_parser
from dist_train.errors import ConfigError

from conftest import cli
from helpers_bench import QUICKSTART, TINY

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
    from dist_train.bench.strategy_contender import _bucket_bytes, _grad_bytes, _optim_bytes

    model = torch.nn.Linear(10, 4)  # 44 fp32 parameters: 176 bytes
    opt = torch.optim.AdamW(model.parameters())
    assert _grad_bytes(opt) == 0 and _optim_bytes(opt) == 0  # nothing before the first step
    model(torch.randn(3, 10)).sum().backward()
    assert _grad_bytes(opt) == 176
    opt.step()
    # Two moments per parameter, plus Adam's scalar step counter per tensor.
    assert _optim_bytes(opt) == 2 * 176 + 2 * torch.zeros(()).element_size()
    assert _bucket_bytes(model) == 0  # only DDP keeps buckets


def test_data_bench_needs_loading_workers() -> None:
    args = BenchArgs("data", None, ("data.num_workers=0",), nproc=1, steps=1, warmup=0, repeats=1)
    with pytest.raises(ConfigError, match=r"data\.num_workers"):
        load_runner(get_benchmark("data"))(args)
