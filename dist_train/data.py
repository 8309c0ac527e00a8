"""Datasets and the world-size-invariant sampler.

Every dataset answers `len()` and `get_batch(indices) -> (inputs, targets)`. The sampler maps
(seed, step) to one global batch of indices; each rank takes its contiguous slice, so the data a
run sees is the same for any number of workers (and for any resume point).
"""

from __future__ import annotations

import glob
import os
import random
import sysconfig
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from dist_train.config import RunConfig, call_target, resolve_target
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


def _user_callable(target: str | None, key: str) -> Callable[..., Any] | None:
    """`data.transform` / `data.collate`: a function, or a class built with no arguments."""
    if not target:
        return None
    obj = resolve_target(target, key)
    if isinstance(obj, type):
        obj = call_target(target, key, key)
    if not callable(obj):
        raise ConfigError(key, target, f"{type(obj).__name__} is not callable")
    return obj  # type: ignore[no-any-return]


class GlobalBatchSampler:
    """Global batch at `step` = positions [step*B, (step+1)*B) of an endless stream of epochs,
    each epoch a permutation seeded by (seed, epoch): a pure function of (seed, step)."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one randperm per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=g)
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        start, n = step * self.global_batch_size, self.num_samples
        parts, pos = [], start
        while pos < start + self.global_batch_size:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + self.global_batch_size - pos)
            parts.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rank_indices(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        per_rank = self.global_batch_size // world_size
        return self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]


def default_corpus(max_chars: int) -> str:
    """Python's own standard library source: real text present on every machine with Python."""
    stdlib = sysconfig.get_paths()["stdlib"]
    chunks, total = [], 0
    for path in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        chunks.append(text)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    corpus = "".join(chunks)
    return corpus[:max_chars] if max_chars else corpus


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


def _char_data(cfg: RunConfig) -> Data:
    if cfg.data.path:
        path = Path(cfg.data.path)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "file not found"
            raise ConfigError("data.path", cfg.data.path, f"{what}; expected a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError("data.path", cfg.data.path, f"not UTF-8 text ({e.reason})") from None
    else:
        text = default_corpus(cfg.data.max_chars)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    vocab = np.unique(codes)
    tokens = np.searchsorted(vocab, codes).astype(np.int16 if len(vocab) < 2**15 else np.int32)
    chars = [chr(c) for c in vocab]
    stoi = {ch: i for i, ch in enumerate(chars)}

    def encode(s: str) -> list[int]:
        return [stoi[ch] for ch in s if ch in stoi]

    def decode(ids: list[int]) -> str:
        return "".join(chars[i] for i in ids)

    spec = DataSpec(
        "lm",
        vocab_size=len(chars),
        tokens_per_sample=block_size(cfg),
        encode=encode,
        decode=decode,
    )
    return _split_windows(cfg, tokens, None, spec, "data.path")


def _token_data(cfg: RunConfig) -> Data:
    """train.bin/val.bin of `dist-train prepare` or nanoGPT: dist_train/tokens.py (imported
    here, as it builds on this module's Data and windows)."""
    from dist_train.tokens import token_data

    return token_data(cfg)


def _split_windows(
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


def _synthetic_data(cfg: RunConfig) -> Data:
    """A fixed random teacher network labels Gaussian inputs: learnable, deterministic by seed."""
    d = cfg.data
    g = torch.Generator().manual_seed(cfg.train.seed)
    shape = tuple(d.input_shape)
    inputs = torch.randn(d.num_samples, *shape, generator=g)
    flat = inputs.flatten(1)
    hidden = torch.tanh(flat @ torch.randn(flat.shape[1], 64, generator=g) / flat.shape[1] ** 0.5)
    if d.task == "classification":
        targets = (hidden @ torch.randn(64, d.num_classes, generator=g)).argmax(1)
        num_outputs = d.num_classes
    else:
        targets = hidden @ torch.randn(64, 1, generator=g) / 8**0.5
        num_outputs = 1
    order = torch.randperm(d.num_samples, generator=g)
    n_val = int(d.num_samples * d.val_fraction)
    val_idx, train_idx = order[:n_val], order[n_val:]
    train = TensorPairDataset(inputs[train_idx], targets[train_idx])
    val = TensorPairDataset(inputs[val_idx], targets[val_idx]) if n_val else None
    return Data(train, val, DataSpec(d.task, input_shape=shape, num_outputs=num_outputs))


def _user_data(cfg: RunConfig) -> Data:
    """`data._target_`: called as Class(split="train"|"val", **kwargs), or, when
    `data.train_kwargs`/`val_kwargs` are set, as Class(**kwargs, **train_kwargs) and
    Class(**kwargs, **val_kwargs) (no val_kwargs: no validation set). It may return a map-style
    dataset of (input, target) or an object with get_batch; its `task` attribute picks the loss."""
    d = cfg.data
    target, per_split = d._target_ or "", bool(d.train_kwargs or d.val_kwargs)

    def make(split: str) -> BatchDataset | None:
        if per_split:
            extra = d.train_kwargs if split == "train" else d.val_kwargs
            if split == "val" and not extra:
                return None
            ds = call_target(target, "data._target_", f"data.{split}_kwargs", **d.kwargs, **extra)
        else:
            try:
                ds = call_target(target, "data._target_", "data._target_", split=split, **d.kwargs)
            except ConfigError as e:
                if "does not fit its signature" not in e.reason:
                    raise
                raise ConfigError(
                    e.key,
                    e.value,
                    f"{e.reason}; a dataset without split= takes data.train_kwargs and "
                    "data.val_kwargs instead, e.g. {train: true} and {train: false}",
                ) from None
        if hasattr(ds, "get_batch"):
            if d.transform or d.collate:
                key = "data.transform" if d.transform else "data.collate"
                raise ConfigError(
                    key, d.transform or d.collate, f"{target} builds its own batches (get_batch)"
                )
            return ds  # type: ignore[no-any-return]
        return MapDatasetAdapter(ds, transform, collate or default_collate)

    transform = _user_callable(d.transform, "data.transform")
    collate = _user_callable(d.collate, "data.collate")

    train, val = make("train"), make("val")
    assert train is not None  # only the validation split may be absent
    task = getattr(getattr(train, "dataset", train), "task", "classification")
    return Data(train, val if val is not None and len(val) else None, DataSpec(task))


def build_data(cfg: RunConfig) -> Data:
    if cfg.data._target_:
        return _user_data(cfg)
    builders = {"text": _char_data, "tokens": _token_data, "synthetic": _synthetic_data}
    return builders[cfg.data.name](cfg)
