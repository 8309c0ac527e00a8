"""`dist-train train` and the worker entry: a single process trains itself, `--nproc N` (or
several nodes) starts a launcher, and under torchrun each worker runs `run_worker`. Torch loads
only when the command runs, so `dist-train --help` stays light."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dist_train.cli.run_args import add_run_args, launch_config
from dist_train.errors import DistTrainError, PeerError
from dist_train.launch.quiet import quiet_other_ranks
from dist_train.launch.rundir import OWNER_ENV, RunLock, owned_run_dir
from dist_train.launch.signals import StopRequest

if TYPE_CHECKING:
    from dist_train.config.schema import RunConfig
    from dist_train.launch.env import DistEnv


def run_worker(
    cfg: RunConfig,
    owned: bool = False,
    claim: Callable[[], None] | None = None,
    launched_at: float | None = None,
) -> int:
    """One worker's whole life: join the group, train, always leave the group. `owned`: the
    caller (this process, or the launcher of `--nproc N`) holds the run directory; under plain
    torchrun nobody does yet, and rank 0 takes it. `claim`: the owner's moves in it
    (`lifecycle.Start.apply`), made once every check has passed. `launched_at`: when the command
    started (Unix time), where goodput's start-up counts from."""
    from dist_train.launch.env import dist_session, read_env, under_torchrun
    from dist_train.launch.faults import fault_for, progress_for
    from dist_train.launch.shared_dir import check_shared_run_dir
    from dist_train.launch.watch import Watch
    from dist_train.train.build import build_trainer

    stop = StopRequest()
    stop.install()
    env = read_env(cfg.train.device)
    fault = fault_for(env.rank, stop)  # a test's DIST_TRAIN_FAULT; None for every real run
    progress = progress_for(fault)
    owned = owned or OWNER_ENV in os.environ
    watch = Watch(env, progress) if under_torchrun() else None
    try:
        with (
            dist_session(env, cfg.parallel.timeout_s),
            nullcontext(claim) if owned else _rank0_owns(cfg, env) as claim,
        ):
            check_shared_run_dir(Path(cfg.train.run_dir), env)
            if env.is_main and not owned:  # plain torchrun or accelerate: nobody said it yet
                _say_world(env)
            trainer = build_trainer(cfg, env, stop, progress, claim, fault, launched_at)
            try:
                if fault is not None:  # a test's: built, and the loop is next
                    fault.reached("start-up", trainer.state.step + 1)
                stop.arm()  # from here a stop signal saves at the next log step
                trainer.fit()
            finally:
                if watch is not None:
                    watch.leaving = True  # closing (an async save may finish): not stuck
                trainer.close()
    except (Exception, KeyboardInterrupt) as e:
        if watch is None:
            raise
        watch.leaving = True
        # A peer that timed out or went away (also during a save): named in one line that a
        # retry can fix, not our traceback. Explain first (it reads the peers' progress), then
        # tell them: a stalled peer is ended FAILED_GRACE_S after `failed()`, and must not exit
        # before this rank has said why.
        error = watch.explain(e, cfg.parallel.timeout_s, Path(cfg.train.run_dir))
        if error is not e or not getattr(e, "on_every_rank", False):  # those: every rank alike
            watch.failed()
        if error is e:
            raise
        watch.leave(error)
    finally:
        if watch is not None:
            watch.close()
    return 0


def _say_world(env: DistEnv) -> None:
    """Plain torchrun or accelerate started the workers: nobody has said yet what runs."""
    nodes = env.world_size // env.local_world_size
    print(
        f"dist-train: {env.world_size} workers ({nodes} node(s)), {env.backend} on "
        f"{env.device.type}",
        flush=True,
    )


def _recover_checkpoints(run_dir: Path) -> None:
    """The owner, first thing: finish or roll back what a crash cut short among the
    checkpoints, before anything decides from them where the run resumes."""
    from dist_train.checkpoint.recovery import recover_checkpoints

    recover_checkpoints(run_dir, lambda line: print(line, flush=True))


@contextmanager
def _rank0_owns(cfg: RunConfig, env: DistEnv) -> Iterator[Callable[[], None] | None]:
    """Plain torchrun: rank 0 locks the run directory and decides how this start continues it
    (`inspect_run_dir`), and every rank learns whether it could (a collective), so no rank
    trains on alone or waits for a peer that left. Yields the claim every rank passes to
    `build_trainer` (rank 0's makes the moves), or None for a restarted group, which continues
    what the first one started."""
    from dist_train.launch.env import all_agree, restart_count
    from dist_train.train.lifecycle import inspect_run_dir

    lock, error = RunLock(Path(cfg.train.run_dir)), None
    apply: Callable[[], None] = _nothing
    if env.is_main:
        try:
            lock.acquire()
            _recover_checkpoints(lock.run_dir)
            if restart_count() == 0:  # a restarted group continues what the first one started
                apply = inspect_run_dir(cfg).apply
        except DistTrainError as e:
            error = e
    try:
        if not all_agree(error is None, env):
            raise error or PeerError(f"rank 0 could not take {cfg.train.run_dir}")
        yield apply if restart_count() == 0 else None
    finally:
        lock.release()


def _nothing() -> None:
    """The claim of a rank that is not rank 0: rank 0 makes the moves."""


def cmd_train(args: argparse.Namespace) -> int:
    quiet_other_ranks()  # before the config's _target_ may import transformers
    from dist_train.config.load import load_config

    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes)  # before torch: bad input is quick
    from dist_train.launch.clock import LAUNCHED_AT_ENV, launched_at
    from dist_train.launch.env import foreign_launch, under_torchrun
    from dist_train.launch.faults import FAULT_ENV, parse_fault

    parse_fault(os.environ.get(FAULT_ENV))  # a test's fault: a malformed one is bad input
    # Said once per run: by the process the user started, or by rank 0 under plain torchrun
    # (the workers our launcher starts read the same config again and stay quiet).
    if not under_torchrun() or (os.environ.get("RANK") == "0" and OWNER_ENV not in os.environ):
        for note in notes:
            print(f"note: {note}", flush=True)
    from dist_train.launch.launcher import check_launch, launch
    from dist_train.train.lifecycle import inspect_run_dir
    from dist_train.train.plan import build_plan, device_kind

    if under_torchrun():  # we are a worker: torchrun already decided the world
        return run_worker(cfg, launched_at=launched_at(args.started))
    lc = launch_config(args, cfg.parallel.timeout_s)
    check_launch(lc, device_kind(cfg))
    foreign = foreign_launch(lc.nnodes)
    if foreign:
        raise DistTrainError(foreign)
    run_dir = Path(cfg.train.run_dir)
    # The single process, or the launcher of node 0, owns the run directory for the whole run
    # (restarts included) from before it reads it; workers and other nodes are told so.
    with owned_run_dir(run_dir) if lc.node_rank == 0 else nullcontext():
        if lc.node_rank == 0:
            _recover_checkpoints(run_dir)
        if lc.world_size == 1:
            return _train_alone(cfg, args.started)
        with _quiet_transformers():
            # Every config error surfaces here, once.
            plan = build_plan(cfg, lc.world_size, lc.nproc)
        # Node 0 owns the directory and decides how this start continues it (reading only).
        start = inspect_run_dir(cfg) if lc.node_rank == 0 else None
        done = start.done if start is not None else plan.done
        if done is not None:  # nothing to train: nothing started, nothing written
            print(done)
            return 0
        print(
            f"dist-train: {lc.nproc} workers x {lc.nnodes} node(s), {plan.backend} on "
            f"{plan.device}, global batch {plan.global_batch_size} = {plan.micro_batch_size} x "
            f"{plan.accumulation_steps} accumulation x {plan.world_size} workers",
            flush=True,
        )
        for note in plan.notes:
            print(f"note: {note}", flush=True)
        if start is not None:
            start.apply(print)
        os.environ[OWNER_ENV] = f"launcher {os.getpid()}"
        os.environ[LAUNCHED_AT_ENV] = repr(args.started)  # the workers' start-up counts from it
        worker_args = ["train", args.config, *args.overrides]
        return launch(lc, worker_args, run_dir, saves=cfg.checkpoint.enabled)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """The launcher's plan builds the model too (on the meta device): transformers' warnings
    about its config are rank 0's to say, not the launcher's as well."""
    transformers = sys.modules.get("transformers")
    if transformers is None:  # no _target_ named one of its classes
        yield
        return
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _train_alone(cfg: RunConfig, started: float) -> int:
    """One process, no launcher: it decides how this start continues the run directory it
    owns, and is the worker; the moves that decision makes wait until every check passed.
    `started`: when the command started (Unix time)."""
    from dist_train.train.lifecycle import inspect_run_dir
    from dist_train.train.plan import device_kind

    start = inspect_run_dir(cfg)
    if start.done is not None:  # nothing to train: nothing built, nothing written
        print(start.done)
        return 0
    print(f"dist-train: 1 process on {device_kind(cfg)} (--nproc N: N workers)", flush=True)
    if any(var.startswith("ACCELERATE_") for var in os.environ):
        print(
            "note: `accelerate launch` started a single process; for N workers use "
            "`accelerate launch --multi_gpu --num_processes N` (CPU too) or --nproc N",
            flush=True,
        )
    return run_worker(cfg, owned=True, claim=lambda: start.apply(print), launched_at=started)


def add_train_parser(sub: Any) -> None:
    train = sub.add_parser("train", help="train from a config (one process, or --nproc N)")
    add_run_args(train, restarts=True)
    train.set_defaults(func=cmd_train)
