"""Activation checkpointing: a block's activations are dropped after its forward and computed
again in backward, trading about one more forward for the memory they held."""

from __future__ import annotations

from torch import nn
from torch.distributed._composable import checkpoint

from dist_train.config.schema import ParallelConfig
from dist_train.errors import ConfigError
from dist_train.models.protocol import fsdp_units


def recomputed_units(model: nn.Module, cfg: ParallelConfig) -> list[nn.Module]:
    """The blocks whose activations are recomputed: every block (`full`) or every n-th from the
    first (`every_n`); the blocks are the model's FSDP units (`protocol.fsdp_units`)."""
    mode = cfg.activation_checkpointing
    if mode == "none":
        return []
    units = fsdp_units(model)
    if not units:
        raise ConfigError(
            "parallel.activation_checkpointing",
            mode,
            f"{type(model).__name__} names no blocks to recompute (an fsdp_units() method, or "
            "transformers' _no_split_modules); use none",
        )
    step = 1 if mode == "full" else cfg.activation_checkpointing_every
    return units[::step]


def apply_activation_checkpointing(model: nn.Module, cfg: ParallelConfig) -> None:
    """In place, before compile and wrapping. torch's composable `checkpoint` works by hooks, so
    parameter names (and hence checkpoints and exports) are the same with and without it. It
    restores the RNG state for the recomputation: dropout draws the same masks twice."""
    for unit in recomputed_units(model, cfg):
        checkpoint(unit)
