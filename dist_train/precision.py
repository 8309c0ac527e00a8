"""Mixed precision in one small object: autocast, backward, unscale, step, state."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

from dist_train.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """fp32 does nothing; bf16/fp16 autocast the forward on the run's device while parameters
    and optimizer state stay fp32; fp16 adds a loss scaler that skips steps with inf/nan grads."""

    def __init__(self, cfg: PrecisionConfig, device: torch.device) -> None:
        self.device_type = device.type
        self.dtype = DTYPES[cfg.dtype]
        # torch.amp.GradScaler(device) works on CPU too; the legacy torch.cuda.amp one
        # silently disables itself there.
        self.scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "fp16" else None

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

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)  # skipped when the unscaled grads hold inf/nan
            self.scaler.update()
        else:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler and state:
            self.scaler.load_state_dict(state)
