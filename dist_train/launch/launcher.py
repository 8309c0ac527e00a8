"""Start N workers through torchrun's elastic agent; we write no process manager of our own."""

from __future__ import annotations

import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dist_train.errors import (
    EXIT_INFRA,
    EXIT_INPUT,
    EXIT_PREEMPTED,
    EXIT_UNSAVED,
    ConfigError,
    InfraError,
    first_line,
)
from dist_train.launch.network import (
    IFNAME_VARS,
    default_route_addr,
    interface_of,
    is_loopback,
    local_addr_to,
    wait_for_endpoint,
)
from dist_train.launch.signals import PREEMPT_SIGNALS

# torch loads only once the workers start: a bad command line fails fast without it.
if TYPE_CHECKING:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError


@dataclass(frozen=True)
class LaunchConfig:
    nproc: int = 1  # workers on this node
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # host:port of the rendezvous, for more than one node
    rdzv_id: str = "dist_train"
    max_restarts: int = 0  # torchrun restarts the whole worker group this often after a failure
    shutdown_timeout_s: int = 30  # after a stop signal, how long the workers may take to save
    rdzv_timeout_s: int = 600  # how long the nodes wait for each other at the start

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes


def max_local_workers(device: str) -> int:
    """One worker per GPU; on CPU one per core (a worker needs at least one core to itself)."""
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return os.cpu_count() or 1


def check_launch(launch: LaunchConfig, device: str) -> None:
    if launch.nproc < 1:
        raise ConfigError("--nproc", launch.nproc, "must be >= 1")
    limit = max_local_workers(device)
    unit = "GPUs" if device == "cuda" else "CPU cores"
    if device == "cuda" and limit == 0:  # the device setting is wrong, not the worker count
        raise ConfigError(
            "train.device",
            device,
            "no CUDA GPU is visible on this machine; use train.device=cpu (or auto)",
        )
    if launch.nproc > limit:
        raise ConfigError(
            "--nproc", launch.nproc, f"this machine has {limit} {unit}; use --nproc <= {limit}"
        )
    if launch.nnodes < 1:
        raise ConfigError("--nnodes", launch.nnodes, "must be >= 1")
    if launch.nnodes > 1 and not launch.rdzv_endpoint:
        raise ConfigError("--rdzv-endpoint", None, "required with --nnodes > 1 (host:port)")
    if launch.rdzv_endpoint is not None:
        check_endpoint(launch.rdzv_endpoint)
    if not 0 <= launch.node_rank < launch.nnodes:
        raise ConfigError("--node-rank", launch.node_rank, f"expected 0..{launch.nnodes - 1}")
    if launch.rdzv_timeout_s < 1:
        raise ConfigError("--rdzv-timeout", launch.rdzv_timeout_s, "must be >= 1 (seconds)")


def check_endpoint(endpoint: str) -> None:
    """HOST:PORT with a port torchrun can use (an IPv6 host goes in brackets: [::1]:29400)."""
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(
            "--rdzv-endpoint", endpoint, "expected HOST:PORT with a port 1-65535, e.g. node0:29400"
        )


def torchrun_argv(launch: LaunchConfig, worker_args: list[str], log_dir: Path) -> list[str]:
    """torchrun's command line for `python -m dist_train <worker_args>` on every worker."""
    argv = [
        f"--nproc-per-node={launch.nproc}",
        f"--max-restarts={launch.max_restarts}",
        f"--log-dir={log_dir}",
        f"--shutdown-timeout={launch.shutdown_timeout_s}",
        # The agent forwards these to the workers, which save at the next log step;
        # SIGUSR1 is SLURM's warning ahead of a time limit (`#SBATCH --signal=USR1@120`).
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1",
    ]
    if launch.nnodes == 1 and not launch.rdzv_endpoint:
        argv.append("--standalone")  # local rendezvous on a free port
    else:
        # A fixed set of nodes, each told its rank: torchrun's static rendezvous. Node 0 hosts
        # the store (c10d's dynamic one hosts it only where the endpoint is this machine's
        # hostname) and holds global rank 0 (c10d orders nodes by address); and a node whose
        # peer vanished exits instead of waiting ~15 minutes in c10d's store.
        argv += [
            f"--nnodes={launch.nnodes}",
            f"--node-rank={launch.node_rank}",
            "--rdzv-backend=static",
            f"--rdzv-endpoint={launch.rdzv_endpoint}",
            f"--rdzv-id={launch.rdzv_id}",
            f"--rdzv-conf=timeout={launch.rdzv_timeout_s}",
        ]
    return [*argv, "--module", "dist_train", *worker_args]


def threads_per_worker(nproc: int) -> int:
    return max(1, (os.cpu_count() or 1) // nproc)


def agent_log_dir(run_dir: str | Path) -> Path:
    """Where torchrun's agent keeps its per-launch folders (error files of failed workers):
    inside the run, never as a `torchelastic_*` folder in the system temp directory."""
    return Path(run_dir) / "logs" / "agent"


def remove_empty_dirs(root: Path) -> None:
    """Drop the agent's folders that hold no file (a healthy launch leaves only empty ones)."""
    if not root.is_dir():
        return
    # Bottom-up, and every step may find the folder gone or filled: the launchers of other
    # nodes share the run directory and tidy it at the same time (os.walk skips what vanished).
    walked = [Path(path) for path, _, _ in os.walk(root, topdown=False)]
    for path in [*walked, root.parent]:
        try:
            path.rmdir()  # only an empty folder goes
        except OSError:
            continue


def how_it_ended(exitcode: int) -> str:
    """A worker's end in words: a negative code is the signal that killed it, which printed
    nothing (an out-of-memory kill is SIGKILL)."""
    if exitcode == EXIT_PREEMPTED:
        return f"stopped on a stop signal (exit code {exitcode}; node 0 says what was saved)"
    if exitcode == EXIT_INPUT:  # a dist-train error: the worker printed it as one line
        return "stopped the run with the error above"
    if exitcode == EXIT_INFRA:  # it printed which peer, node or network failed
        return "lost a peer, its node or the network (the error above)"
    if exitcode >= 0:
        return f"failed with exit code {exitcode} (its output is above)"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    hint = " (the kernel's out-of-memory killer sends it too)" if name == "SIGKILL" else ""
    return f"was killed by {name}{hint}, so it printed nothing"


def exit_status(exitcode: int) -> int:
    """The launcher's status for a worker's: a worker killed by a signal (the out-of-memory
    killer, a node going down) is an infrastructure failure a retry can fix, like a lost peer;
    the others pass through (2: the input, 1: a bug, 138/143: retryable)."""
    return EXIT_INFRA if exitcode < 0 else exitcode


def join_nodes(launch: LaunchConfig) -> None:
    """Before the rendezvous: make gloo and NCCL use the interface that reaches the endpoint
    (each variable unless the user set it), and say what this node waits for."""
    endpoint = str(launch.rdzv_endpoint)
    addr = local_addr_to(endpoint)
    if is_loopback(addr):
        # Node 0 reaching its own endpoint through loopback (a PyTorchJob's master is given
        # MASTER_ADDR=localhost; Ubuntu maps the hostname to 127.0.1.1): the peers need the
        # address they reach, which is most likely the default route's.
        addr = default_route_addr() or addr
    ifname = None if is_loopback(addr) else interface_of(addr)
    for var in IFNAME_VARS:
        if ifname is not None:
            os.environ.setdefault(var, ifname)
    chosen = [f"{var}={os.environ[var]}" for var in IFNAME_VARS if var in os.environ]
    print(
        f"dist-train: node {launch.node_rank} of {launch.nnodes} ({addr}; "
        f"{', '.join(chosen) or 'interface: the default'}): waiting up to "
        f"{launch.rdzv_timeout_s} s (--rdzv-timeout) for all {launch.nnodes} nodes at {endpoint}",
        flush=True,
    )


def quiet_agent_loggers() -> None:
    """`LOGLEVEL` (CRITICAL unless the user set it: `cli.main`) on torchrun's loggers that exist
    already: each reads it once, when created, and a program that runs our `main` may have
    imported torchrun before."""
    level = os.environ.get("LOGLEVEL", "CRITICAL")
    agent = ("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if name.startswith(agent) and isinstance(logger, logging.Logger):
            logger.setLevel(level)


def launch(
    launch: LaunchConfig, worker_args: list[str], run_dir: str | Path, saves: bool = True
) -> int:
    """Run the workers and wait; returns the exit status to use (a worker's own on failure).
    `saves`: checkpoints are enabled, so a stop signal ends with a checkpoint (status 143)."""
    from torch.distributed import DistError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    quiet_agent_loggers()
    # Split the cores between local workers unless the user chose (torchrun would pick 1).
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_worker(launch.nproc)))
    log_dir = agent_log_dir(run_dir)
    if launch.nnodes > 1:
        join_nodes(launch)
    try:
        # Node 0 hosts the store: another node waits for it here, within --rdzv-timeout.
        if launch.node_rank > 0 and not wait_for_endpoint(
            str(launch.rdzv_endpoint), launch.rdzv_timeout_s
        ):
            raise _rendezvous_failed(launch, "node 0's endpoint did not answer")
        run(parse_args(torchrun_argv(launch, worker_args, log_dir)))
    except DistError as e:  # the agents' store: a node that never came, an unreachable node 0
        raise _rendezvous_failed(launch, first_line(e)) from None
    except ChildFailedError as e:
        return _worker_failed(e)
    except SignalException as e:  # the agent has forwarded it and waited for the workers
        return _stopped_by(e.sigval, saves)
    finally:
        remove_empty_dirs(log_dir)
    return 0


def _rendezvous_failed(launch: LaunchConfig, why: str) -> InfraError:
    """Retryable: a node the scheduler started late, or lost, comes next time; a wrong endpoint
    fails every retry the same way, and the line says what to check."""
    return InfraError(
        f"--rdzv-endpoint={launch.rdzv_endpoint!r}: the rendezvous of {launch.nnodes} node(s) "
        f"failed ({why}); all nodes must start the same command within --rdzv-timeout="
        f"{launch.rdzv_timeout_s} s, with --node-rank 0..{launch.nnodes - 1} and node 0's "
        "address as the endpoint"
    )


def _worker_failed(error: ChildFailedError) -> int:
    """Name the worker that failed first and return the status that says what a retry can do
    (see `exit_status`). A worker that stopped on a stop signal (one that reached another node,
    or a worker alone) did so once every rank had saved the checkpoint: not an error."""
    rank, failure = error.get_first_failure()  # the root cause; the others were stopped after it
    if failure.exitcode == EXIT_PREEMPTED:
        print(
            "dist-train: the workers stopped on a stop signal that reached another node or a "
            "worker (not this launcher); rank 0's line says what was saved; exit status "
            f"{EXIT_PREEMPTED}: run the same command to continue",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    status = exit_status(failure.exitcode)
    retry = " (a retry can fix it)" if status == EXIT_INFRA else ""
    print(
        f"error: worker rank {rank} {how_it_ended(failure.exitcode)}; the other workers "
        f"were stopped; exit status {status}{retry}",
        file=sys.stderr,
    )
    return status


def _stopped_by(sigval: signal.Signals, saves: bool) -> int:
    """What a stop signal forwarded to the workers came to, and the exit status that says it."""
    if sigval in PREEMPT_SIGNALS and saves:
        print(
            # Rank 0's line says what was saved: a checkpoint at the step reached, or nothing
            # when the signal came before the loop (nothing trained, nothing to lose).
            f"dist-train: {sigval.name}: the workers stopped (rank 0's line above says what "
            f"was saved); exit status {EXIT_PREEMPTED}: run the same command to continue",
            file=sys.stderr,
        )
        return EXIT_PREEMPTED
    if sigval in PREEMPT_SIGNALS:
        print(
            f"dist-train: {sigval.name}: the workers stopped; checkpoint.enabled=false, "
            f"so nothing was saved (exit status {EXIT_UNSAVED})",
            file=sys.stderr,
        )
        return EXIT_UNSAVED
    print(f"interrupted ({sigval.name}): all workers stopped", file=sys.stderr)
    return 128 + int(sigval)
