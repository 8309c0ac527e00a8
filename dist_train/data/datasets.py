"""The dataset pieces every source is built into: what a batch dataset offers, the data's
spec, next-token windows, tensor pairs and the adapter for a user's map-style dataset."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError


class BatchDataset(Protocol):
    def __len__(self) -> int: ...
    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class DataSpec:
    task: str  # lm | classification | regression
    vocab_size: int = 0  # lm
    input_shape: tuple[int, ...] = ()  # one sample's input
    num_outputs: int = 1  # classes, or regression targets
    tokens_per_sample: int = 0  # lm: for tokens/s
    encode: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None


@dataclass
class Data:
    train: BatchDataset
    val: BatchDataset | None
    spec: DataSpec


class WindowDataset:
    """Next-token windows over a 1-D token array: sample i is tokens[i : i + block + 1]."""

    def __init__(self, tokens: np.ndarray, block_size: int) -> None:
        self.tokens, self.block_size = tokens, block_size
        self._offsets = np.arange(block_size + 1)

    def __len__(self) -> int:
        return max(0, len(self.tokens) - self.block_size)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.tokens[indices.numpy()[:, None] + self._offsets]  # one vectorized gather
        windows = torch.from_numpy(rows.astype(np.int64))
        return windows[:, :-1], windows[:, 1:]


class TensorPairDataset:
    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def get_batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]


class MapDatasetAdapter:
    """Any map-style dataset whose items are (input, target): each item through the user's
    transform (if any), then collated (torch's default_collate, or the user's)."""

    def __init__(
        self,
        dataset: Any,
        transform: Callable[[Any], Any] | None = None,
        collate: Callable[[list[Any]], Any] = default_collate,
    ) -> None:
        self.dataset, self.transform, self.collate = dataset, transform, collate

    def __len__(self) -> int:
        return len(self.dataset)

    def get_batch(
        self, indices: torch.Tensor, seeds: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`seeds`: one per sample, set in torch, `random` and numpy before the sample is read,
        so its random augmentation depends on nothing else (loading workers pass them)."""
        items = []
        for n, i in enumerate(indices.tolist()):
            if seeds is not None:
                seed_everything(seeds[n])
            item = self.dataset[i]
            items.append(item if self.transform is None else self.transform(item))
        inputs, targets = self.collate(items)
        return inputs, targets


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def block_size(cfg: RunConfig) -> int:
    """Text and token data are cut into windows of the model's context length: the model
    section's `block_size` (gpt's and a `_target_` model's; mlp and cnn have none)."""
    block = getattr(cfg.model, "block_size", None)
    if block is None:
        model = (
            f"model._target_={cfg.model._target_}"
            if cfg.model._target_
            else f"model.name={cfg.model.name}"
        )
        raise ConfigError(
            "data.name",
            cfg.data.name,
            f"is cut into windows of model.block_size tokens, and {model} has no block_size "
            "(token data trains model.name=gpt or a model._target_)",
        )
    return int(block)


def split_windows(
    cfg: RunConfig, tokens: np.ndarray, val_tokens: np.ndarray | None, spec: DataSpec, key: str
) -> Data:
    block = block_size(cfg)
    if val_tokens is None:  # the tail is validation: contiguous, so no window straddles both
        cut = int(len(tokens) * (1 - cfg.data.val_fraction))
        tokens, val_tokens = tokens[:cut], tokens[cut:]
    train = WindowDataset(tokens, block)
    if len(train) < 1:
        raise ConfigError(
            key,
            cfg.data.path,
            f"{len(tokens)} training tokens is too short for model.block_size={block}",
        )
    val = WindowDataset(val_tokens, block)
    return Data(train, val if len(val) > 0 else None, spec)
