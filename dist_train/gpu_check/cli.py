"""Command line of `python -m dist_train.gpu_check`: select, run, report, exit status."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dist_train.gpu_check.runner import (
    FAIL,
    PASS,
    SKIP,
    Check,
    CheckResult,
    Context,
    Sizes,
    environment,
    run_check,
    write_report,
)

EXIT_PASS, EXIT_FAIL, EXIT_USAGE, EXIT_NO_CUDA = 0, 1, 2, 3
EPILOG = (
    "exit status: 0 every check passed (skips allowed), 1 a check failed, 2 bad arguments, "
    "3 no CUDA device (without --device cpu; the JSON is written, every check skipped)"
)

GPU = Sizes(
    train_steps=200,
    compile_steps=60,
    resume_every=20,
    export_steps=30,
    warmup_steps=10,
    timed_steps=50,
    model=(),
    compile_big=True,
    big_model=(
        "model.n_layer=12",
        "model.n_head=12",
        "model.n_embd=768",
        "model.block_size=1024",
        "train.global_batch_size=16",
        "train.micro_batch_size=16",
    ),
)
# Tiny sizes: the plumbing of every check runs for real on a laptop CPU in seconds.
CPU = Sizes(
    train_steps=40,
    compile_steps=20,
    resume_every=6,
    export_steps=6,
    warmup_steps=2,
    timed_steps=3,
    compile_big=False,
    model=(
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=32",
        "model.block_size=32",
        "data.max_chars=100000",
        "train.eval_batches=2",
    ),
    big_model=(
        "model.n_layer=2",
        "model.n_head=2",
        "model.n_embd=64",
        "model.block_size=64",
        "train.global_batch_size=4",
        "train.micro_batch_size=4",
    ),
)


class UsageError(Exception):
    """Bad arguments: one line on stderr, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m dist_train.gpu_check",
        epilog=EPILOG,
        description="Prepared checks of dist_train on one NVIDIA GPU (about 4-8 minutes); "
        "writes one JSON file of results and prints a summary.",
    )
    parser.add_argument(
        "--out", default="gpu_check.json", help="JSON results (default: %(default)s)"
    )
    parser.add_argument("--only", default=None, metavar="NAME[,NAME]", help="run these checks only")
    parser.add_argument("--dry-run", action="store_true", help="list the checks; touch nothing")
    parser.add_argument(
        "--steps-scale",
        type=float,
        default=1.0,
        metavar="FLOAT",
        help="multiply the checks' step counts, warm-up excepted (default 1)",
    )
    parser.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda",
        help="cpu: the same checks on tiny sizes, to test this tool without a GPU",
    )
    return parser


def select(only: str | None, checks: Sequence[Check]) -> list[Check]:
    if only is None:
        return list(checks)
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = [c.name for c in checks]
    if not names or any(n not in known for n in names):
        raise UsageError(f"--only={only}: expected one of {', '.join(known)}")
    return [c for c in checks if c.name in names]


def validate(args: argparse.Namespace) -> None:
    if not args.steps_scale > 0:
        raise UsageError(f"--steps-scale={args.steps_scale}: expected a number > 0")
    if Path(args.out).is_dir():
        raise UsageError(f"--out={args.out}: is a directory; expected a file name")
    folder = Path(args.out).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"--out={args.out}: directory {folder} does not exist or is not writable")


def make_context(args: argparse.Namespace, work_dir: Path) -> Context:
    cuda = args.device == "cuda"
    sizes = (GPU if cuda else CPU).scaled(args.steps_scale)
    repo = Path(__file__).resolve().parents[2]  # the checkout (or site-packages when installed)
    return Context(torch.device("cuda", 0) if cuda else torch.device("cpu"), sizes, work_dir, repo)


def run(checks: list[Check], args: argparse.Namespace) -> int:
    start, out = time.perf_counter(), Path(args.out)
    if args.device == "cuda":
        # cuBLAS reads it once, at its first use: deterministic matmuls for the resume check
        # need it set before any check runs. (:4096:8 is also the default size on Hopper.)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = environment(args.device)
    results = [CheckResult(c.name, c.description) for c in checks]
    write_report(out, env, results, 0.0, None)  # a run killed mid-way still leaves its file
    with tempfile.TemporaryDirectory(prefix="dist_train_gpu_check_") as work:
        ctx = make_context(args, Path(work))
        for i, check in enumerate(checks):
            print(f"[{i + 1}/{len(checks)}] {check.name}: {check.description}", flush=True)
            results[i] = run_check(check, ctx)
            print(f"[{i + 1}/{len(checks)}] {check.name}: {line(results[i])}", flush=True)
            write_report(out, env, results, time.perf_counter() - start, None)
    code = EXIT_FAIL if any(r.status == FAIL for r in results) else EXIT_PASS
    wall = time.perf_counter() - start
    write_report(out, env, results, wall, code)
    print_summary(env, results, wall, out)
    return code


def line(r: CheckResult) -> str:
    return f"{r.status.upper():4} {r.duration_s:7.1f}s  {r.error or r.reason or r.summary}"


def print_summary(env: dict[str, Any], results: list[CheckResult], wall: float, out: Path) -> None:
    memory = env["total_memory_bytes"]
    device = (
        f"{env['device_name']} ({env['device_count']} visible, {memory / 2**30:.0f} GiB)"
        if isinstance(memory, int)
        else "no CUDA device"
    )
    print(
        f"\ngpu_check: {device}, torch {env['torch_version']}, CUDA {env['cuda_version']}, "
        f"dist_train {env['dist_train_version']}, mode {env['mode']}"
    )
    for r in results:
        print(f"  {r.name:24} {line(r)}")
    counts = ", ".join(f"{sum(r.status == s for r in results)} {s}" for s in (PASS, FAIL, SKIP))
    print(f"{len(results)} checks: {counts} in {wall:.1f} s; results in {out}", flush=True)


def no_cuda(checks: list[Check], args: argparse.Namespace) -> int:
    """Nothing to check without a GPU: every check skipped, one line, a status of its own."""
    reason = "no CUDA device (torch.cuda.is_available() is False)"
    results = [CheckResult(c.name, c.description, status=SKIP, reason=reason) for c in checks]
    write_report(Path(args.out), environment(args.device), results, 0.0, EXIT_NO_CUDA)
    print(
        f"gpu_check: {reason}, torch {torch.__version__}: all {len(checks)} checks skipped; "
        f"wrote {args.out} (--device cpu runs them on tiny sizes)",
        file=sys.stderr,
    )
    return EXIT_NO_CUDA


def main(argv: Sequence[str] | None = None) -> None:
    from dist_train.gpu_check.checks import CHECKS

    args = build_parser().parse_args(argv)  # argparse's own errors exit with status 2
    try:
        checks = select(args.only, CHECKS)
        validate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    if args.dry_run:
        for c in checks:
            print(f"{c.name:24} {c.description}")
        sys.exit(EXIT_PASS)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit(no_cuda(checks, args))
    try:
        code = run(checks, args)
    except KeyboardInterrupt:
        print(f"interrupted; partial results in {args.out}", file=sys.stderr)
        code = 130
    sys.exit(code)
