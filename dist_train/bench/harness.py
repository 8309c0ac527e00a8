"""Run benchmark workers and time contenders in interleaved rounds inside the same processes.

Workers are spawned here on 127.0.0.1 (gloo, a free port) with torchrun's variables set, so
`read_env`/`dist_session` see exactly what a `--nproc N` run sees; rank 0's result comes back
as JSON through a temporary directory.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import socket
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dist_train.bench.stats import interleaved_order
from dist_train.config.load import load_config
from dist_train.config.schema import RunConfig
from dist_train.launch.env import DistEnv, dist_session, read_env

StepRunner = Callable[[int], None]  # runs n training steps (or n operations) of one contender
Worker = Callable[["BenchArgs", DistEnv], "dict[str, Any] | None"]


class BenchError(RuntimeError):
    """A benchmark worker failed (not an input error: those surface in the parent first)."""


@dataclass(frozen=True)
class BenchArgs:
    name: str
    config: str | None  # YAML path; None: dataclass defaults
    overrides: tuple[str, ...] = ()
    nproc: int = 1
    steps: int = 20  # timed steps (or operations) per contender per round
    warmup: int = 5  # untimed steps per contender before the first round
    repeats: int = 10  # rounds; each contender runs once per round
    threads: int = 1  # intra-op threads per worker, the same for every contender
    run_dir: str = ""  # scratch directory of this invocation (set by run_workers)

    def to_json(self) -> dict[str, Any]:
        """What the user asked for (the scratch directory is gone once the run ends)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "run_dir"}

    @property
    def total_steps(self) -> int:
        """Steps one contender runs: warm-up, timed rounds, one untimed step to count syncs."""
        return self.warmup + self.steps * self.repeats + 1


def bench_config(args: BenchArgs, extra: Sequence[str] = (), run: str = "run") -> RunConfig:
    """The user's config and overrides, then the benchmark's own: a scratch run directory, no
    progress bar, and a schedule as long as the benchmark (the learning rate costs nothing, but
    keeps the run a valid one)."""
    return load_config(
        args.config,
        [
            *args.overrides,
            *extra,
            f"train.run_dir={Path(args.run_dir) / run}",
            "log.progress=never",
            f"train.max_steps={args.total_steps}",
        ],
    )


def max_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Elementwise max of `values` over ranks (the slowest rank sets a step's time); also a
    barrier. Outside timed regions only."""
    if not env.is_distributed:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=env.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _time_round(run: StepRunner, steps: int, env: DistEnv) -> list[float]:
    """Seconds of each step on CPU: a burst of load on a shared machine then spoils a few
    steps, not the round's figure. On a GPU a per-step timer would need a device sync that the
    loops themselves do not have, so the round is timed as a whole (one figure, its mean)."""
    if env.device.type != "cuda":
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            run(1)
            times.append(time.perf_counter() - start)
        return times
    start = time.perf_counter()
    run(steps)
    torch.cuda.synchronize(env.device)  # kernels still queued would escape the timer
    return [(time.perf_counter() - start) / steps]


def measure_interleaved(
    runners: Mapping[str, StepRunner], args: BenchArgs, env: DistEnv
) -> dict[str, list[list[float]]]:
    """Seconds per step (or operation) of each contender: `warmup` untimed steps each, then
    `repeats` rounds of `steps` timed steps each, in rotating order; a list per round. Ranks
    start each round together."""
    for run in runners.values():
        run(args.warmup)
        _settle(env)
    times: dict[str, list[list[float]]] = {name: [] for name in runners}
    for order in interleaved_order(list(runners), args.repeats):
        for name in order:
            _settle(env)
            times[name].append(max_over_ranks(_time_round(runners[name], args.steps, env), env))
    return times


def _settle(env: DistEnv) -> None:
    """Before a round: nothing of the previous contender is left to be charged to the next."""
    gc.collect(1)  # its young garbage (a full collection: ~0.1 s with torch loaded, for nothing)
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)  # its queued kernels
    max_over_ranks([0.0], env)  # and every rank starts together


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker_main(fn: Worker, args: BenchArgs, rank: int, port: int) -> None:
    if args.nproc > 1:  # one worker is a plain process: no group, no DDP, as in `dist-train train`
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(args.nproc),
            LOCAL_WORLD_SIZE=str(args.nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    # Accelerate picks its own thread count when OMP_NUM_THREADS is unset; torch reads the call.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    out = Path(args.run_dir)
    try:
        cfg = bench_config(args)
        env = read_env(cfg.train.device)
        with dist_session(env, timeout_s=cfg.parallel.timeout_s):
            result = fn(args, env)
    except BaseException:  # reported once, by the parent, with the traceback
        (out / f"error{rank}.txt").write_text(traceback.format_exc())
        sys.exit(1)
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result))
    # Skip interpreter teardown: after many trainers (DDP/FSDP, gloo groups) in one process,
    # a C++ destructor at exit aborts now and then ("terminate called without an active
    # exception", torch 2.13) although the group is already destroyed and the result written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _wait(procs: list[Any], deadline: float) -> None:
    """Wait for all; once one fails (or time is up) the rest could only hang: stop them."""
    while any(p.is_alive() for p in procs):
        failed = any(p.exitcode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join()
            return
        procs[0].join(0.2) if procs[0].is_alive() else time.sleep(0.2)


def run_workers(fn: Worker, args: BenchArgs, timeout_s: float = 3600.0) -> dict[str, Any]:
    """Run `fn(args, env)` on `args.nproc` fresh processes; return rank 0's result. Fresh
    processes even for one worker: thread settings and library singletons (Accelerate's state)
    never leak between benchmarks or into the caller."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="dist_train_bench_") as tmp:
        args = dataclasses.replace(args, run_dir=tmp)
        port = free_port()
        procs = [
            ctx.Process(target=_worker_main, args=(fn, args, rank, port))
            for rank in range(args.nproc)
        ]
        for p in procs:
            p.start()
        _wait(procs, time.monotonic() + timeout_s)
        errors = [Path(tmp, f"error{r}.txt") for r in range(args.nproc)]
        messages = [e.read_text() for e in errors if e.exists()]
        codes = [p.exitcode for p in procs]
        if messages or any(codes):
            raise BenchError(f"bench {args.name}: workers exited {codes}\n" + "\n".join(messages))
        return json.loads(Path(tmp, "result.json").read_text())
