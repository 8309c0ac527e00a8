"""Consolidate sharded model weights into one safetensors file, and start runs from weights.

Runs in one process without a process group: DCP reads every rank's shards itself.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from dist_train.checkpoint.files import (
    check_files,
    find_checkpoint,
    read_manifest,
    single_process_quiet,
)
from dist_train.errors import ConfigError
from dist_train.models.hf import is_pretrained_dir, load_pretrained


def load_model_weights(source: str, key: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors from a .safetensors file or a checkpoint/run folder."""
    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ConfigError(key, source, "file not found")
        return load_file(source)
    path = find_checkpoint(source, key)
    check_files(read_manifest(path), path, key)  # sizes and checksums before DCP reads a byte
    metadata = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    weights = {
        name[len("model.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for name, meta in metadata.items()
        if name.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    try:
        with single_process_quiet():
            dcp.load({"model": weights}, checkpoint_id=path, no_dist=True)
    except (Exception, CheckpointException) as e:  # a damaged shard: one line, not a DCP stack
        raise ConfigError(key, source, f"cannot read checkpoint {path} ({e})") from None
    return weights


def export(source: str, out: str) -> Path:
    """Write the model's weights as one safetensors file that `load_state_dict` accepts."""
    target = Path(out)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ConfigError("--out", out, "is a directory; give a file name, e.g. model.safetensors")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError("--out", out, f"directory {folder} does not exist or is not writable")
    weights = load_model_weights(source, "checkpoint")
    save_file({k: v.contiguous() for k, v in weights.items()}, str(target))
    return target


def init_model(model: nn.Module, source: str | None, freeze: list[str]) -> None:
    """`model.init_from` then `model.freeze`, on the plain model before any wrapping. A
    `save_pretrained` folder is read by transformers (the model was built from its config)."""
    if is_pretrained_dir(source):
        load_pretrained(model, str(source), "model.init_from")
    elif source:
        weights = load_model_weights(source, "model.init_from")
        try:
            result = model.load_state_dict(weights, strict=False)
        except RuntimeError as e:  # shape mismatches: name them in one line
            detail = "; ".join(line.strip() for line in str(e).splitlines()[1:4])
            raise ConfigError("model.init_from", source, f"weights do not fit: {detail}") from None
        if result.missing_keys or result.unexpected_keys:
            raise ConfigError(
                "model.init_from",
                source,
                f"weights do not fit the model: missing {result.missing_keys[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}",
            )
    if freeze:
        names = [name for name, _ in model.named_parameters()]
        for pattern in freeze:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ConfigError("model.freeze", pattern, "matches no parameter name")
        for name, param in model.named_parameters():
            if any(fnmatch.fnmatchcase(name, p) for p in freeze):
                param.requires_grad_(False)
