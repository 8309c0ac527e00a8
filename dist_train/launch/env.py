"""The distributed environment: the only module that reads torchrun's variables.

A single process needs no process group; under torchrun (or `--nproc N`) every worker
joins one, with gloo on CPU and nccl on CUDA.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dist_train.errors import ConfigError

TORCHRUN_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str  # gloo | nccl

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def environ_flag(name: str, environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(name, "").lower() in ("1", "true")


def under_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """True inside a worker started by torchrun's elastic agent (or any launcher setting RANK etc.)."""
    return all(v in environ for v in TORCHRUN_VARS)


def process_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's global rank (0 outside torchrun), for deciding who prints."""
    return int(environ.get("RANK", 0))


def restart_count(environ: Mapping[str, str] = os.environ) -> int:
    """How often torchrun's agent has restarted this worker group (0 on the first attempt)."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def all_agree(ok: bool, env: DistEnv) -> bool:
    """True on every rank when `ok` holds on every rank (a collective: all ranks must call)."""
    if not env.is_distributed:
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=env.device)
    dist.all_reduce(flag, op=dist.ReduceOp.SUM)
    return flag.item() == 0


def read_env(device: str = "auto", environ: Mapping[str, str] = os.environ) -> DistEnv:
    """Rank, world size and device from the environment; a plain process is rank 0 of 1."""
    rank = int(environ.get("RANK", 0))
    local_rank = int(environ.get("LOCAL_RANK", 0))
    world_size = int(environ.get("WORLD_SIZE", 1))
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device", device, "CUDA is not available on this machine")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(
                "train.device",
                device,
                f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible)",
            )
        return DistEnv(
            rank, local_rank, world_size, local_world_size, torch.device("cuda", local_rank), "nccl"
        )
    return DistEnv(rank, local_rank, world_size, local_world_size, torch.device("cpu"), "gloo")


@contextmanager
def dist_session(env: DistEnv, timeout_s: float = 600.0) -> Iterator[None]:
    """Join the process group for the duration of a run and always leave it, even on errors."""
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if env.is_distributed and not dist.is_initialized():
        # device_id binds NCCL to this rank's GPU eagerly; gloo ignores it.
        kwargs: dict[str, Any] = {"device_id": env.device} if env.backend == "nccl" else {}
        if environ_flag("TORCHELASTIC_USE_AGENT_STORE"):
            # The agent's store outlives a restart of the worker group (torchrun's static
            # rendezvous keeps one for the whole launch): each attempt gets its own keys, or
            # a restarted group would read the previous attempt's addresses.
            store = dist.TCPStore(
                os.environ["MASTER_ADDR"],
                int(os.environ["MASTER_PORT"]),
                is_master=False,
                timeout=timedelta(seconds=timeout_s),
            )
            kwargs["store"] = dist.PrefixStore(f"dist_train/attempt_{restart_count()}", store)
        dist.init_process_group(
            env.backend,
            rank=env.rank,
            world_size=env.world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Mean over ranks as SUM then divide: ReduceOp.AVG exists only on NCCL."""
    if env.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= env.world_size
    return tensor


def foreign_launch(nnodes: int, environ: Mapping[str, str] = os.environ) -> str | None:
    """What is wrong when another launcher started this process as one of several without
    torchrun's variables: each copy would train alone, racing on one run directory. Returns
    the one-line reason, or None when this process may launch."""
    counts = {  # a variable that says how many copies were started, per launcher
        "OMPI_COMM_WORLD_SIZE": "OpenMPI's mpirun",
        "PMI_SIZE": "an MPI launcher (MPICH, Intel MPI)",
        "SLURM_STEP_NUM_TASKS": "srun",
        "WORLD_SIZE": "a launcher that sets RANK and WORLD_SIZE (a PyTorchJob?)",
    }
    for var, who in counts.items():
        value = environ.get(var, "")
        if value.isdigit() and int(value) > 1 and int(value) != nnodes:
            return (
                f"{var}={value}: {who} started {value} copies of dist-train, which would each "
                f"train alone into one run directory (--nnodes is {nnodes}); start one per node "
                "with --nnodes, --node-rank and --rdzv-endpoint (see launch/), or one with "
                "--nproc N on a single machine"
            )
    return None
