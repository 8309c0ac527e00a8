"""The pieces of a checkpoint that are not DCP's business: per-rank RNG streams, whether DCP
loaded straight into the model's own tensors, and one-line reasons for failures."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor


def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one tensor (GPT's `lm_head.weight` is `wte.weight`).
    Recorded in each checkpoint's manifest: DCP writes every name separately, and an export
    that stores the tensor once, the way `safetensors.torch.save_model` does, must know them."""
    groups: dict[int, list[str]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():  # the objects themselves
        groups.setdefault(id(tensor), []).append(name)
    return sorted(sorted(names) for names in groups.values() if len(names) > 1)


def fill_tied(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The names of `model`'s tied tensors that a file stores once, filled from the stored one
    (`load_model`'s rule), so that `load_state_dict` sees every name."""
    filled = dict(weights)
    for group in tied_names(model):
        present = [n for n in group if n in weights]
        if present:
            filled.update({name: weights[present[0]] for name in group if name not in weights})
    return filled


def local_ptr(t: torch.Tensor) -> int:
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def loaded_in_place(loaded: dict[str, Any], model: nn.Module) -> bool:
    """DCP loads into the tensors it is given; those of `get_model_state_dict` are the model's
    own (parameters and buffers, sharded or not), and then copying them into the model again
    would only cost a pass over the whole state. Any other value (a copy, extra state) needs it."""
    own = {local_ptr(t) for t in model.state_dict().values() if isinstance(t, torch.Tensor)}
    return all(isinstance(v, torch.Tensor) and local_ptr(v) in own for v in loaded.values())
