"""Consolidate sharded model weights into one safetensors file for serving, and start runs
from weights.

Runs in one process without a process group: DCP reads every rank's shards itself.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
from dist_train.checkpoint.serving import serving_metadata
from dist_train.checkpoint.state import tied_names
from dist_train.errors import ConfigError
from dist_train.models.hf import is_pretrained_dir, load_pretrained
from dist_train.parallel.precision import DTYPES


def load_model_weights(source: str, key: str) -> dict[str, torch.Tensor]:
    """Full (unsharded) model tensors from a .safetensors file or a checkpoint/run folder."""
    if source.endswith(".safetensors"):
        if not Path(source).is_file():
            raise ConfigError(key, source, "file not found")
        return load_file(source)
    path = find_checkpoint(source, key)
    return read_checkpoint_weights(path, read_manifest(path), source, key)


def read_checkpoint_weights(
    path: Path, manifest: dict[str, Any], source: str, key: str
) -> dict[str, torch.Tensor]:
    check_files(manifest, path, key)  # sizes and checksums before DCP reads a byte
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


def export(source: str, out: str, dtype: str, say: Callable[[str], None]) -> Path:
    """Write the model's weights as one safetensors file with the run's config in its metadata,
    tied weights stored once (`safetensors.torch.load_model` loads it into a fresh model), and
    floating tensors in `dtype`."""
    target = _check_target(out)
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"expected one of {', '.join(DTYPES)}")
    if source.endswith(".safetensors"):
        raise ConfigError("checkpoint", source, "is an export already; give a run directory")
    path = find_checkpoint(source, "checkpoint")
    manifest = read_manifest(path)
    weights = read_checkpoint_weights(path, manifest, source, "checkpoint")
    if "tied" not in manifest:
        say(
            f"note: {path} predates records of tied weights: every name is stored (load it "
            "with load_state_dict; safetensors.torch.load_model refuses tied copies)"
        )
    kept, dropped = store_once(weights, manifest.get("tied", []))
    cast = {
        name: (t.to(DTYPES[dtype]) if t.is_floating_point() else t).contiguous()
        for name, t in kept.items()
    }
    save_file(cast, str(target), metadata={**serving_metadata(manifest, say), **dropped})
    return target


def _check_target(out: str) -> Path:
    target = Path(out)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise ConfigError("--out", out, "is a directory; give a file name, e.g. model.safetensors")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError("--out", out, f"directory {folder} does not exist or is not writable")
    return target


def store_once(
    weights: dict[str, torch.Tensor], tied: list[list[str]]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`safetensors.torch.save_model`'s rule for shared tensors: of each group the first name
    in sorted order is stored, the others are dropped and named in the metadata as
    `dropped: kept`. `load_model` finds the same groups in the fresh model and fills them."""
    dropped = {
        name: group[0]
        for group in map(sorted, tied)
        if all(n in weights for n in group)
        for name in group[1:]
    }
    return {k: v for k, v in weights.items() if k not in dropped}, dropped


def fill_tied(weights: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The names of `model`'s tied tensors that a file stores once, filled from the stored one
    (`load_model`'s rule), so that `load_state_dict` sees every name."""
    filled = dict(weights)
    for group in tied_names(model):
        present = [n for n in group if n in weights]
        if present:
            filled.update({name: weights[present[0]] for name in group if name not in weights})
    return filled


def init_model(model: nn.Module, source: str | None, freeze: list[str]) -> None:
    """`model.init_from` then `model.freeze`, on the plain model before any wrapping. A
    `save_pretrained` folder is read by transformers (the model was built from its config)."""
    if is_pretrained_dir(source):
        load_pretrained(model, str(source), "model.init_from")
    elif source:
        weights = fill_tied(load_model_weights(source, "model.init_from"), model)
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
