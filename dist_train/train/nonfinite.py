"""Non-finite training: decisions every rank takes alike (from reduced values or through a
collective), so a run stops at one step on all ranks and never saves a NaN."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint.files import complete_checkpoints
from dist_train.errors import NonFiniteError
from dist_train.launch.env import DistEnv, all_agree


def last_good(root: Path) -> str:
    """What is left to go back to, and what to change."""
    found = complete_checkpoints(root)
    where = f"the newest checkpoint, {found[-1]}, is finite" if found else "nothing was saved"
    return f"{where}; lower optim.lr, check the data, or clip gradients (optim.grad_clip)"


def check_finite_before_save(
    model: nn.Module, interval_loss: torch.Tensor, env: DistEnv, step: int, root: Path
) -> None:
    """Collective, on saving steps only: no checkpoint with a non-finite loss since the last
    log step, or non-finite weights (any rank's shard), is ever written."""
    local = [getattr(p, "to_local", lambda p=p: p)() for p in model.parameters()]
    flags = [torch.isfinite(interval_loss), *(torch.isfinite(t).all() for t in local)]
    if not all_agree(bool(torch.stack(flags).all().item()), env):
        raise NonFiniteError(
            f"train.on_nonfinite: the loss or the weights are not finite at step {step}; "
            "stopped without saving them; " + last_good(root)
        )


def check_logged_loss(record: dict[str, Any], last_step: int, mode: str, root: Path) -> None:
    """The logged loss is reduced over ranks, so every rank takes the same decision."""
    step, loss = record["step"], record["loss"]
    if loss is not None and not math.isfinite(loss):
        raise NonFiniteError(
            f"train.on_nonfinite={mode}: the training loss is {loss} in steps "
            f"{last_step + 1}..{step}; stopped without saving it; " + last_good(root)
        )


def loss_scale_warning(record: dict[str, Any], warn_below: float) -> str | None:
    """fp16: a loss scale this low means gradients overflow even unscaled."""
    scale = record.get("loss_scale")
    if scale is None or scale >= warn_below:
        return None
    return (
        f"warning: the fp16 loss scale fell to {scale:.3g} at step {record['step']} (below "
        f"precision.warn_loss_scale={warn_below:g}): gradients overflow even unscaled and "
        f"{record.get('skipped_steps')} steps were skipped; lower optim.lr or use "
        "precision.dtype=bf16"
    )
