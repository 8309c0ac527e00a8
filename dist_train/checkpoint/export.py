"""Consolidate sharded model weights into one safetensors file (or a `save_pretrained` folder)
for serving, and start runs from weights.

Runs in one process without a process group: DCP reads every rank's shards itself.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
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
from dist_train.checkpoint.hf_export import (
    gpt_as_gpt2,
    hf_model,
    is_transformers_target,
    write_pretrained,
)
from dist_train.checkpoint.serving import serving_metadata, tokenizer_record
from dist_train.checkpoint.state import fill_tied
from dist_train.errors import ConfigError
from dist_train.models import gpt_core
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


FORMATS = ("safetensors", "hf")
# The built-in GPT's architecture, copied beside a .safetensors export: torch + safetensors load
# it without dist_train (README, "Export for serving").
STANDALONE = "gpt_model.py"


def export(
    source: str, out: str, dtype: str, say: Callable[[str], None], fmt: str = "safetensors"
) -> Path:
    """Write the model's weights as one safetensors file with the run's config in its metadata,
    tied weights stored once (`safetensors.torch.load_model` loads it into a fresh model), and
    floating tensors in `dtype`; `fmt="hf"`: a `save_pretrained` folder instead."""
    if fmt not in FORMATS:
        raise ConfigError("--format", fmt, f"expected one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"expected one of {', '.join(DTYPES)}")
    target = _check_target(out, fmt)
    if source.endswith(".safetensors"):
        raise ConfigError("checkpoint", source, "is an export already; give a run directory")
    path = find_checkpoint(source, "checkpoint")
    manifest = read_manifest(path)
    weights = read_checkpoint_weights(path, manifest, source, "checkpoint")
    job = ExportJob(path, manifest, weights, target, dtype, say)
    if fmt == "hf":
        _export_hf(job)
    else:
        _export_safetensors(job)
    return target


@dataclass(frozen=True)
class ExportJob:
    """What either format is written from."""

    checkpoint: Path
    manifest: dict[str, Any]
    weights: dict[str, torch.Tensor]
    target: Path
    dtype: str
    say: Callable[[str], None]


def _export_safetensors(job: ExportJob) -> None:
    model, weights, target = job.manifest["config"]["model"], job.weights, job.target
    builtin_gpt = model.get("name") == "gpt" and not model.get("_target_")
    standalone = _check_standalone(target) if builtin_gpt else None
    hf_config = None
    if is_transformers_target(model):  # its complete config: vocab_size, special-token ids
        built = hf_model(model, weights, "exporting a transformers model")
        config = built.config  # type: ignore[union-attr]
        hf_config = json.loads(config.to_json_string(use_diff=False))
    if "tied" not in job.manifest:
        job.say(
            f"note: {job.checkpoint} predates records of tied weights: every name is stored "
            "(load it with load_state_dict; safetensors.torch.load_model refuses tied copies)"
        )
    kept, dropped = store_once(weights, job.manifest.get("tied", []))
    cast = {
        name: (t.to(DTYPES[job.dtype]) if t.is_floating_point() else t).contiguous()
        for name, t in kept.items()
    }
    vocab = weights["lm_head.weight"].shape[0] if builtin_gpt else None
    metadata = serving_metadata(job.manifest, job.say, vocab, hf_config)
    save_file(cast, str(target), metadata={**metadata, **dropped})
    share(target)
    if standalone is not None:
        standalone.write_text(Path(gpt_core.__file__).read_text())
        share(standalone)
        job.say(f"wrote {standalone} (the model in pure torch: `from gpt_model import load`)")


def _export_hf(job: ExportJob) -> None:
    manifest, weights, target = job.manifest, job.weights, job.target
    model = manifest["config"]["model"]
    if is_transformers_target(model):
        built = hf_model(model, weights, "--format hf")
    elif model.get("name") == "gpt" and not model.get("_target_"):
        built = gpt_as_gpt2(model, weights)
    else:
        what = f"model._target_={model['_target_']}" if model.get("_target_") else None
        raise ConfigError(
            "--format",
            "hf",
            f"{what or 'model.name=' + str(model.get('name'))} has no transformers class to "
            "map onto (the built-in gpt and transformers models do); use --format safetensors",
        )
    extra = {
        "tokenizer": tokenizer_record(manifest["config"]["data"], job.say),
        "step": manifest["step"],
        "version": manifest.get("versions", {}).get("dist_train", ""),
    }
    target.mkdir(exist_ok=True)
    write_pretrained(built, target, DTYPES[job.dtype], extra)
    for written in target.iterdir():
        share(written)


def share(path: Path) -> None:
    """Exports are meant to be shared: the mode a plain open() gives (0666 less the umask), not
    the 0600 of the private temporary file safetensors writes through and renames."""
    mask = os.umask(0)  # the only way to read it; set back at once (the CLI is one thread)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _check_target(out: str, fmt: str) -> Path:
    target = Path(out)
    folder = target.parent if str(target.parent) else Path(".")
    if fmt == "hf" and target.is_file():
        raise ConfigError("--out", out, "is a file; --format hf writes a folder, e.g. model-hf")
    earlier_export = (target / "config.json").is_file()
    if fmt == "hf" and target.is_dir() and any(target.iterdir()) and not earlier_export:
        raise ConfigError(
            "--out", out, "holds other files; give a new or empty folder (or an hf export)"
        )
    if fmt == "safetensors" and target.is_dir():
        raise ConfigError("--out", out, "is a directory; give a file name, e.g. model.safetensors")
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ConfigError("--out", out, f"directory {folder} does not exist or is not writable")
    return target


def _check_standalone(target: Path) -> Path:
    """gpt_model.py beside the export: replaced when an export wrote it, else never touched."""
    standalone = target.parent / STANDALONE
    ours = Path(gpt_core.__file__).read_text()
    marker = ours.splitlines()[0]
    if standalone.exists() and standalone.read_text().splitlines()[:1] != [marker]:
        raise ConfigError(
            "--out",
            str(target),
            f"{standalone} exists and is not an export's model file; export into another folder",
        )
    return standalone


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
