"""FSDP2 and activation checkpointing as one writes them by hand, for the hand-written loops the
benchmarks hold dist_train against: `fully_shard` on each block and then the root, on a mesh
built here (1-D, or 2-D for HSDP), and torch's composable `checkpoint` on each block."""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)

from dist_train.config.schema import RunConfig
from dist_train.launch.env import DistEnv
from dist_train.models.protocol import fsdp_units
from dist_train.parallel.precision import DTYPES

SHARDED_BY_HAND = ("zero2", "fsdp", "hsdp")


def mesh_by_hand(strategy: str, cfg: RunConfig, env: DistEnv) -> DeviceMesh:
    """Every rank on one axis; HSDP: replicas of `parallel.shard_size` consecutive ranks (by
    default one node's workers), sharded within and all-reduced across."""
    if strategy != "hsdp":
        return init_device_mesh(env.device.type, (env.world_size,))
    shard = cfg.parallel.shard_size or env.local_world_size
    return init_device_mesh(
        env.device.type, (env.world_size // shard, shard), mesh_dim_names=("replicate", "shard")
    )


def shard_by_hand(model: nn.Module, strategy: str, cfg: RunConfig, env: DistEnv) -> nn.Module:
    """FSDP2 in place: each block the model names, then the root, with the mixed-precision
    policy of the run's precision settings. zero2 keeps each block gathered from its forward
    to its backward (`reshard_after_forward=False`); fsdp and hsdp follow the config."""
    mesh = mesh_by_hand(strategy, cfg, env)
    policy = MixedPrecisionPolicy(
        param_dtype=DTYPES[cfg.precision.dtype], reduce_dtype=DTYPES[cfg.precision.reduce_dtype]
    )
    offload = (
        CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
        if cfg.parallel.cpu_offload
        else OffloadPolicy()
    )
    reshard = cfg.parallel.reshard_after_forward and strategy != "zero2"
    for block in fsdp_units(model):
        fully_shard(
            block,
            mesh=mesh,
            mp_policy=policy,
            offload_policy=offload,
            reshard_after_forward=reshard,
        )
    # The root (embeddings, tied head) is used again right away by backward: kept gathered.
    fully_shard(
        model, mesh=mesh, mp_policy=policy, offload_policy=offload, reshard_after_forward=False
    )
    return model


def checkpoint_by_hand(model: nn.Module, cfg: RunConfig) -> None:
    """Recompute each block's activations in backward (`full`), or every n-th block's from the
    first (`every_n`); in place, before any wrapping, as the framework does."""
    mode = cfg.parallel.activation_checkpointing
    if mode == "none":
        return
    step = 1 if mode == "full" else cfg.parallel.activation_checkpointing_every
    for block in fsdp_units(model)[::step]:
        checkpoint(block)
