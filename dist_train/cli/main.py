"""The `dist-train` command: train, check, export, prepare, sample, bench, sweep, report.

User errors print as one line on stderr and exit with status 2, before any worker starts
whenever they can be found in the parent. Sub-commands import what they need when they run, so
`dist-train --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

import dist_train
from dist_train.bench.registry import add_bench_parser
from dist_train.cli.prepare import add_prepare_parser
from dist_train.cli.sample import add_sample_parser
from dist_train.cli.sweep import add_sweep_report_parsers
from dist_train.config.versions import check_torch_version
from dist_train.errors import DistTrainError, PeerError
from dist_train.launch.rundir import OWNER_ENV, RunLock, owned_run_dir, prepare
from dist_train.launch.signals import (
    EXIT_PREEMPTED,
    EXIT_UNSAVED,
    PREEMPT_SIGNALS,
    Preempted,
    StopRequest,
    Terminated,
)

if TYPE_CHECKING:
    from dist_train.config.schema import RunConfig
    from dist_train.launch.env import DistEnv
    from dist_train.launch.launcher import LaunchConfig


def run_worker(cfg: RunConfig, owned: bool = False) -> int:
    """One worker's whole life: join the group, train, always leave the group. `owned`: the
    caller (this process, or the launcher of `--nproc N`) holds the run directory; under plain
    torchrun nobody does yet, and rank 0 takes it."""
    from dist_train.launch.env import dist_session, read_env, under_torchrun
    from dist_train.launch.watch import Progress, Watch, check_shared_run_dir
    from dist_train.train.build import build_trainer

    stop = StopRequest()
    stop.install()
    env = read_env(cfg.train.device)
    owned = owned or OWNER_ENV in os.environ
    watch = Watch(env) if under_torchrun() else None
    try:
        with (
            dist_session(env, cfg.parallel.timeout_s),
            nullcontext() if owned else _rank0_owns(cfg, env),
        ):
            check_shared_run_dir(Path(cfg.train.run_dir), env)
            if env.is_main and not owned:  # plain torchrun or accelerate: nobody said it yet
                nodes = env.world_size // env.local_world_size
                print(
                    f"dist-train: {env.world_size} workers ({nodes} node(s)), {env.backend} on "
                    f"{env.device.type}",
                    flush=True,
                )
            trainer = build_trainer(cfg, env, stop, watch.progress if watch else Progress())
            try:
                stop.arm()  # from here a stop signal saves at the next log step
                trainer.fit()
            finally:
                if watch is not None:
                    watch.leaving = True  # closing (an async save may finish): not stuck
                trainer.close()
    except RuntimeError as e:  # a peer that timed out or went away: name it, not our traceback
        if watch is None:
            raise
        watch.leaving = True
        watch.failed()
        raise watch.explain(e, cfg.parallel.timeout_s, Path(cfg.train.run_dir)) from None
    except (Exception, KeyboardInterrupt) as e:
        if watch is not None:
            watch.leaving = True
            if not getattr(e, "on_every_rank", False):  # every rank raises those by itself
                watch.failed()
        raise
    finally:
        if watch is not None:
            watch.close()
    return 0


def _fresh_start(cfg: RunConfig) -> bool:
    from dist_train.checkpoint.files import resolve_resume

    return resolve_resume(cfg) is None


@contextmanager
def _rank0_owns(cfg: RunConfig, env: DistEnv) -> Iterator[None]:
    """Plain torchrun: rank 0 locks and prepares the run directory and every rank learns
    whether it could (a collective), so no rank trains on alone or waits for a peer that left."""
    from dist_train.launch.env import all_agree, restart_count

    lock, error = RunLock(Path(cfg.train.run_dir)), None
    if env.is_main:
        try:
            lock.acquire()
            if restart_count() == 0:  # a restarted group continues what the first one prepared
                prepare(lock.run_dir, _fresh_start(cfg), cfg.train.overwrite, print)
        except DistTrainError as e:
            error = e
    try:
        if not all_agree(error is None, env):
            raise error or PeerError(f"rank 0 could not take {cfg.train.run_dir}")
        yield
    finally:
        lock.release()


def _raise_terminated(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def _launch_config(args: argparse.Namespace, timeout_s: int = 30) -> LaunchConfig:
    from dist_train.launch.launcher import LaunchConfig

    nproc = 1 if args.nproc is None else args.nproc  # an explicit 0 is an error, not "default"
    return LaunchConfig(
        nproc=nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        rdzv_timeout_s=args.rdzv_timeout,
        max_restarts=getattr(args, "max_restarts", 0),
        # After a stop signal the agent waits this long for the workers' checkpoint before it
        # kills them; healthy workers exit as soon as it is written.
        shutdown_timeout_s=max(30, timeout_s),
    )


def cmd_train(args: argparse.Namespace) -> int:
    from dist_train.config.load import load_config

    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input is quick
    from dist_train.launch.env import foreign_launch, under_torchrun
    from dist_train.launch.launcher import check_launch, launch
    from dist_train.train.plan import build_plan, device_kind

    if under_torchrun():  # we are a worker: torchrun already decided the world
        return run_worker(cfg)
    lc = _launch_config(args, cfg.parallel.timeout_s)
    check_launch(lc, device_kind(cfg))
    foreign = foreign_launch(lc.nnodes)
    if foreign:
        raise DistTrainError(foreign)
    run_dir = Path(cfg.train.run_dir)
    # The single process, or the launcher of node 0, owns the run directory for the whole run
    # (restarts included) from before it reads it; workers and other nodes are told so.
    with owned_run_dir(run_dir) if lc.node_rank == 0 else nullcontext():
        if lc.world_size == 1:
            prepare(run_dir, _fresh_start(cfg), cfg.train.overwrite, print)
            print(f"dist-train: 1 process on {device_kind(cfg)} (--nproc N: N workers)", flush=True)
            if any(var.startswith("ACCELERATE_") for var in os.environ):
                print(
                    "note: `accelerate launch` started a single process; for N workers use "
                    "`accelerate launch --multi_gpu --num_processes N` (CPU too) or --nproc N",
                    flush=True,
                )
            return run_worker(cfg, owned=True)
        plan = build_plan(cfg, lc.world_size)  # every config error surfaces here, once
        if plan.resume_step >= cfg.train.max_steps:
            print(
                f"done already: {plan.resume_from} is at step {plan.resume_step} "
                f"(train.max_steps={cfg.train.max_steps}); raise train.max_steps to train further"
            )
            return 0
        print(
            f"dist-train: {lc.nproc} workers x {lc.nnodes} node(s), {plan.backend} on "
            f"{plan.device}, global batch {plan.global_batch_size} = {plan.micro_batch_size} x "
            f"{plan.accumulation_steps} accumulation x {plan.world_size} workers",
            flush=True,
        )
        for note in plan.notes:
            print(f"note: {note}", flush=True)
        if lc.node_rank == 0:
            prepare(run_dir, plan.resume_from is None, cfg.train.overwrite, print)
        os.environ[OWNER_ENV] = f"launcher {os.getpid()}"
        worker_args = ["train", args.config, *args.overrides]
        return launch(lc, worker_args, run_dir, saves=cfg.checkpoint.enabled)


def cmd_check(args: argparse.Namespace) -> int:
    from dist_train.config.load import load_config, to_yaml

    cfg = load_config(args.config, args.overrides)  # before torch loads: bad input is quick
    from dist_train.launch.launcher import check_launch
    from dist_train.train.plan import build_plan, device_kind

    lc = _launch_config(args)
    check_launch(lc, device_kind(cfg))
    print(to_yaml(cfg), end="")
    print(build_plan(cfg, lc.world_size).format())
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.export import export

    path = export(args.source, args.out, args.dtype, print)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def _add_run_args(p: argparse.ArgumentParser, *, restarts: bool) -> None:
    p.add_argument("config", help="YAML experiment file, or a shipped config's name (quickstart)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=None, help="workers on this node (default 1)")
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        help="nodes taking part; the same command runs on each (default 1)",
    )
    p.add_argument(
        "--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1 (default 0)"
    )
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="dist_train", help="same on every node of one job")
    p.add_argument(
        "--rdzv-timeout",
        type=int,
        default=600,
        help="seconds the nodes wait for each other at the start (default 600)",
    )
    if restarts:
        p.add_argument(
            "--max-restarts",
            type=int,
            default=0,
            help="restart the worker group this many times after a failure",
        )


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (like every other input error), status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="dist-train", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {dist_train.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a config (one process, or --nproc N)")
    _add_run_args(train, restarts=True)
    train.set_defaults(func=cmd_train)
    check = sub.add_parser("check", help="validate; print the resolved config and the plan")
    _add_run_args(check, restarts=False)
    check.set_defaults(func=cmd_check)
    export = sub.add_parser("export", help="consolidate a sharded checkpoint into .safetensors")
    export.add_argument("source", help="a run directory or one checkpoints/step_N folder")
    export.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    export.add_argument(
        "--dtype",
        default="fp32",
        help="floating tensors as fp32 (default, as trained), bf16 or fp16",
    )
    export.set_defaults(func=cmd_export, overrides=[])
    add_prepare_parser(sub)
    add_sample_parser(sub)
    add_bench_parser(sub)
    add_sweep_report_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    # First thing: a stop signal during start-up (torch's import takes seconds) ends the run
    # through the exit path below, with the documented status and a line saying so.
    for signum in PREEMPT_SIGNALS:
        signal.signal(signum, _raise_terminated)
    parser = build_parser()
    # Overrides may come before or after options: collect stray key=value words too.
    args, extra = parser.parse_known_args(argv)
    unknown = [word for word in extra if "=" not in word or word.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    try:
        check_torch_version()
        code = args.func(args)
    except DistTrainError as e:
        if _speaks(e):
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except Terminated as e:
        print(f"terminated ({signal.Signals(e.args[0]).name}) before training", file=sys.stderr)
        code = EXIT_PREEMPTED
    except Preempted as e:
        if _speaks(e):
            print(e.message(), file=sys.stderr, flush=True)
        code = EXIT_PREEMPTED if e.saved else EXIT_UNSAVED
    sys.exit(code)


def _speaks(error: BaseException) -> bool:
    """Errors every rank raises alike are printed by rank 0 only; a `quiet` one by nobody."""
    if getattr(error, "quiet", False):
        return False
    if isinstance(error, Preempted) or getattr(error, "on_every_rank", False):
        # Imported here: a plain input error, found before torch loads, need not load it.
        from dist_train.launch.env import process_rank

        return process_rank() == 0
    return True
