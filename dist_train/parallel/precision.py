"""Mixed precision in one small object: autocast, backward, unscale, step, state."""

from __future__ import annotations

import warnings
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from dist_train.config.schema import PrecisionConfig
from dist_train.errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """fp32 does nothing; bf16/fp16 autocast the forward on the run's device while parameters
    and optimizer state stay fp32; fp16 adds a loss scaler that skips steps with inf/nan grads."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device) -> None:
        self.device_type = device.type
        self.dtype = DTYPES[cfg.dtype]
        check_supported(cfg.dtype, device)
        # torch.amp.GradScaler(device) works on CPU too (the legacy torch.cuda.amp one silently
        # disables itself there), and on FSDP2's sharded DTensor grads: an inf in any rank's
        # shard makes every rank skip, so no separate sharded scaler is needed.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)

    @property
    def needs_grad_norm(self) -> bool:
        """fp16 reads the gradient norm each step to count skipped steps without a host sync."""
        return self.scaler is not None

    def autocast(self) -> AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Bring gradients back to true scale (before clipping or measuring them)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer, grad_norm: torch.Tensor | None) -> None:
        if self.scaler:
            # The scaler skips the step when the unscaled grads hold inf/nan (then the norm is
            # not finite), halves the scale, and doubles it after 2000 good steps in a row.
            self.scaler.step(optimizer)
            self.scaler.update()
            if grad_norm is not None:
                self.skipped_steps += ~torch.isfinite(grad_norm)
        else:
            optimizer.step()

    def log_fields(self) -> dict[str, float]:
        """Extra metrics for log steps (a host sync, so only there)."""
        if not self.scaler:
            return {}
        return {
            "loss_scale": self.scaler.get_scale(),
            "skipped_steps": int(self.skipped_steps.item()),
        }

    def state_dict(self) -> dict[str, Any]:
        if not self.scaler:
            return {}
        return {"scaler": self.scaler.state_dict(), "skipped_steps": self.skipped_steps.item()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_steps.fill_(state["skipped_steps"])


def check_supported(dtype: str, device: torch.device) -> None:
    """Refuse a precision the device cannot autocast to, instead of silently running fp32."""
    if dtype == "fp32":
        return
    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision.dtype", dtype, "this GPU has no bf16 support; use fp16")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast(device.type, dtype=DTYPES[dtype]):
            pass
    if any("not supported" in str(w.message) for w in caught):
        raise ConfigError(
            "precision.dtype",
            dtype,
            f"autocast to {dtype} is not supported on {device.type} by this torch build",
        )
