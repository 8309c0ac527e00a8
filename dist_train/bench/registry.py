"""`dist-train bench NAME`: contenders timed side by side, reported as medians and ratios.

Adding a benchmark is one module with `run(BenchArgs) -> BenchReport` and one entry below.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_train.config.load import load_config
from dist_train.config.schema import RunConfig, accumulation_steps
from dist_train.config.yaml_io import shipped_configs_dir
from dist_train.errors import ConfigError
from dist_train.launch.launcher import LaunchConfig, check_launch, threads_per_worker

if TYPE_CHECKING:  # the harness imports torch: only a benchmark that runs pays for it
    from dist_train.bench.harness import BenchArgs
    from dist_train.bench.report import BenchReport

# The quickstart model is the reference size (shipped inside the package, or the checkout's).
DEFAULT_CONFIG = shipped_configs_dir() / "quickstart.yaml"


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    target: str  # "module:function", function(BenchArgs) -> BenchReport, imported when chosen
    nproc: int = 1  # default number of workers
    min_nproc: int = 1
    check: str = ""  # "module:function(cfg, nproc)" raising ConfigError for configs it cannot run
    steps: int = 20  # default timed steps (or operations) per contender per round
    warmup: int = 5
    repeats: int = 10
    requires: str = ""  # an optional extra this benchmark imports (pyproject's extras name it)
    overrides: tuple[str, ...] = ()  # this benchmark's own defaults, before the user's overrides


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        "overhead",
        "dist_train's training step vs a minimal hand-written PyTorch loop "
        "(DDP; FSDP2 with parallel.strategy=fsdp)",
        "dist_train.bench.overhead:run",
        repeats=15,
        check="dist_train.bench.loops:check_hand_written",
    ),
    Benchmark(
        "accelerate",
        "dist_train's training step vs a minimal Hugging Face Accelerate loop",
        "dist_train.bench.accelerate_loop:run",
        repeats=15,
        check="dist_train.bench.accelerate_loop:check_config",
        requires="accelerate",
    ),
    Benchmark(
        "allreduce",
        "all-reduce bus bandwidth over message sizes (gradient sync's limit)",
        "dist_train.bench.allreduce:run",
        nproc=2,
        min_nproc=2,
        steps=10,
        warmup=3,
    ),
    Benchmark(
        "scaling",
        "samples/s at 1 and N workers with the same per-worker batch",
        "dist_train.bench.scaling:run",
        nproc=2,
        min_nproc=2,
    ),
    # 16 contenders (8 rows and their hand-written twins) of a model big enough that memory
    # matters (12 layers, 512 wide: 38 M parameters) on 2 x 128 tokens per rank: a step takes
    # 1-2.5 s on one core, so few short rounds keep it to about 5 minutes.
    Benchmark(
        "strategies",
        "ddp/zero2/fsdp/hsdp x activation checkpointing off/on, each vs its hand-written loop: "
        "step time, peak and activation memory per rank, the plan's estimate",
        "dist_train.bench.strategies:run",
        nproc=2,
        min_nproc=2,
        check="dist_train.bench.strategies:check_config",
        steps=2,
        warmup=0,  # the 2 probe steps after each build (memory) warm it up already
        repeats=4,
        overrides=(
            "model.n_layer=12",
            "model.n_head=8",
            "model.n_embd=512",
            "model.block_size=128",
            "train.global_batch_size=4",
            "data.max_chars=500000",
        ),
    ),
    Benchmark(
        "data",
        "costly map-style samples: DataLoader workers in dist_train vs a hand-written "
        "DataLoader loop, and vs loading on the training thread",
        "dist_train.bench.data_bench:run",
        check="dist_train.bench.data_bench:check_config",
        repeats=8,
    ),
    # A save is one operation of a second or so: one per contender per round.
    Benchmark(
        "checkpoint",
        "Checkpointer save/async/load GB/s vs raw files, torch.save/load, "
        "memcopy, slow storage, training during a save",
        "dist_train.bench.checkpoint_bench:run",
        check="dist_train.bench.checkpoint_bench:check_config",
        steps=1,
        warmup=1,
        repeats=8,
    ),
)


def get_benchmark(name: str) -> Benchmark:
    for bench in BENCHMARKS:
        if bench.name == name:
            return bench
    raise ConfigError("bench", name, f"expected one of {', '.join(b.name for b in BENCHMARKS)}")


def _resolve(target: str) -> Callable[..., Any]:
    module, _, function = target.partition(":")
    return getattr(importlib.import_module(module), function)


def load_runner(bench: Benchmark) -> Callable[[BenchArgs], BenchReport]:
    return _resolve(bench.target)


def split_config(words: Sequence[str]) -> tuple[str | None, list[str]]:
    """`[config] key=value ...`: the one word without '=' is the config file."""
    paths = [w for w in words if "=" not in w]
    if len(paths) > 1:
        raise ConfigError("config", " ".join(paths), "expected one config file")
    config = paths[0] if paths else (str(DEFAULT_CONFIG) if DEFAULT_CONFIG.is_file() else None)
    return config, [w for w in words if "=" in w]


def make_args(ns: argparse.Namespace) -> tuple[BenchArgs, RunConfig]:
    """Validate in the parent, once, before any worker starts: input errors exit with status 2."""
    from dist_train.bench.harness import BenchArgs
    from dist_train.train.plan import device_kind

    bench: Benchmark = ns.bench
    config, overrides = split_config(ns.overrides)
    overrides = [*bench.overrides, *overrides]
    cfg = load_config(config, overrides)
    check_launch(LaunchConfig(nproc=ns.nproc), device_kind(cfg))
    if ns.nproc < bench.min_nproc:
        raise ConfigError(
            "--nproc", ns.nproc, f"bench {bench.name} needs at least {bench.min_nproc} workers"
        )
    for flag, value, low in (
        ("--steps", ns.steps, 1),
        ("--repeats", ns.repeats, 1),
        ("--warmup", ns.warmup, 0),
    ):
        if value < low:
            raise ConfigError(flag, value, f"must be >= {low}")
    accumulation_steps(cfg, ns.nproc)  # a batch that does not split fails here, not in a worker
    if bench.requires and importlib.util.find_spec(bench.requires) is None:
        raise ConfigError(
            "bench",
            bench.name,
            f"needs the optional dependency "
            f"'{bench.requires}': pip install 'dist-train[{bench.requires}]'",
        )
    if bench.check:
        _resolve(bench.check)(cfg, ns.nproc)
    # Every contender gets the same threads: the cores split between workers, as a
    # `--nproc N` run does, unless the user chose.
    threads = int(os.environ.get("OMP_NUM_THREADS") or threads_per_worker(ns.nproc))
    args = BenchArgs(
        bench.name, config, tuple(overrides), ns.nproc, ns.steps, ns.warmup, ns.repeats, threads
    )
    return args, cfg


def cmd_bench(ns: argparse.Namespace) -> int:
    from dist_train.bench.harness import BenchError
    from dist_train.bench.report import format_table, write_json

    args, cfg = make_args(ns)
    try:
        report = load_runner(ns.bench)(args)
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(report))
    # fsdp is the one strategy setting that changes the work at a given --nproc (auto and ddp
    # are the same run): its figures get their own file instead of overwriting DDP's.
    fsdp = "_fsdp" if cfg.parallel.strategy == "fsdp" else ""
    default = (
        Path("bench_results") / f"{args.name}_nproc{args.nproc}_{cfg.precision.dtype}{fsdp}.json"
    )
    path = write_json(report, Path(ns.out) if ns.out else default)
    print(f"raw figures: {path}")
    return 0


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`dist-train bench NAME ...`, one sub-command per registered benchmark."""
    parser = subparsers.add_parser(
        "bench", help="benchmarks: measured medians and ratios", description=__doc__.splitlines()[0]
    )
    names = parser.add_subparsers(dest="benchmark", required=True, metavar="NAME")
    for bench in BENCHMARKS:
        p = names.add_parser(bench.name, help=bench.help, description=bench.help)
        own = f"; this benchmark's defaults first: {' '.join(bench.overrides)}"
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="[config] key=value",
            help=f"YAML file (default {DEFAULT_CONFIG.name}) and overrides"
            + (own if bench.overrides else ""),
        )
        p.add_argument(
            "--nproc", type=int, default=bench.nproc, help="workers (default %(default)s)"
        )
        p.add_argument(
            "--steps",
            type=int,
            default=bench.steps,
            help="timed steps per contender per round (default %(default)s)",
        )
        p.add_argument(
            "--warmup",
            type=int,
            default=bench.warmup,
            help="untimed steps per contender first (default %(default)s)",
        )
        p.add_argument(
            "--repeats",
            type=int,
            default=bench.repeats,
            help="rounds, contenders interleaved (default %(default)s)",
        )
        p.add_argument(
            "--out",
            default=None,
            help="JSON file of every raw figure (default "
            f"bench_results/{bench.name}_nprocN_DTYPE[_fsdp].json)",
        )
        p.set_defaults(func=cmd_bench, bench=bench)
