"""`build_data`: the configured data (`data.name` or a user's `data._target_`), split into
training and validation sets."""

from __future__ import annotations

import glob
import os
import sysconfig
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate

from dist_train.config.schema import RunConfig
from dist_train.config.targets import call_target, resolve_target
from dist_train.data.datasets import (
    BatchDataset,
    Data,
    DataSpec,
    MapDatasetAdapter,
    TensorPairDataset,
    block_size,
    split_windows,
)
from dist_train.errors import ConfigError


def user_callable(target: str | None, key: str) -> Callable[..., Any] | None:
    """`data.transform` / `data.collate`: a function, or a class built with no arguments."""
    if not target:
        return None
    obj = resolve_target(target, key)
    if isinstance(obj, type):
        obj = call_target(target, key, key)
    if not callable(obj):
        raise ConfigError(key, target, f"{type(obj).__name__} is not callable")
    return obj  # type: ignore[no-any-return]


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


def char_alphabet(text: str) -> str:
    """The char tokenizer's vocabulary: every character of the text, in code point order (id i
    is the i-th). An export records the same alphabet, read again from the same text."""
    return "".join(sorted(set(text)))


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
    chars = char_alphabet(text)
    vocab = np.array([ord(ch) for ch in chars], dtype=np.uint32)
    tokens = np.searchsorted(vocab, codes).astype(np.int16 if len(vocab) < 2**15 else np.int32)
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
    return split_windows(cfg, tokens, None, spec, "data.path")


def _token_data(cfg: RunConfig) -> Data:
    """train.bin/val.bin of `dist-train prepare` or nanoGPT: dist_train/data/tokens.py (imported
    here, as it builds on this module's Data and windows)."""
    from dist_train.data.tokens import token_data

    return token_data(cfg)


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

    transform = user_callable(d.transform, "data.transform")
    collate = user_callable(d.collate, "data.collate")

    train, val = make("train"), make("val")
    assert train is not None  # only the validation split may be absent
    task = getattr(getattr(train, "dataset", train), "task", "classification")
    return Data(train, val if val is not None and len(val) else None, DataSpec(task))


def build_data(cfg: RunConfig) -> Data:
    if cfg.data._target_:
        return _user_data(cfg)
    builders = {"text": _char_data, "tokens": _token_data, "synthetic": _synthetic_data}
    return builders[cfg.data.name](cfg)
