"""The run summary: what a run is about to do, gathered once before its first step for rank 0's
console, metrics.jsonl's `run_start` record and the trackers; and the `model.init_from` line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from dist_train.checkpoint.export import init_model
from dist_train.config.schema import RunConfig
from dist_train.data.datasets import Data
from dist_train.launch.env import DistEnv
from dist_train.models.hf import is_pretrained_dir, load_pretrained
from dist_train.parallel.wrap import describe

SHOWN_NAMES = 3  # newly initialised tensors named in the init_from line; the rest counted


def init_weights(model: nn.Module, cfg: RunConfig, resume_from: Path | None) -> str | None:
    """`model.init_from` (not on a resume: the checkpoint has the weights) then `model.freeze`;
    returns the line saying what was loaded, or None when nothing was."""
    source = None if resume_from else cfg.model.init_from
    freeze = list(cfg.model.freeze)
    total = len(model.state_dict())
    if not source:
        init_model(model, None, freeze)
        return None
    if not is_pretrained_dir(source):  # our own weights: loaded strictly, or refused
        init_model(model, source, freeze)
        return f"{total} of {total} tensors from {source}; nothing newly initialised"
    info = load_pretrained(model, str(source), "model.init_from")
    init_model(model, None, freeze)
    fresh = info["missing_keys"] + info["mismatched_keys"]
    line = f"{total - len(fresh)} of {total} tensors from {source} (save_pretrained folder); "
    if not fresh:
        line += "nothing newly initialised"
    else:
        more = len(fresh) - SHOWN_NAMES
        line += f"newly initialised: {', '.join(fresh[:SHOWN_NAMES])}"
        line += f" and {more} more" if more > 0 else ""
    unused = len(info["unexpected_keys"])
    return line + (f"; {unused} of the folder's tensors unused" if unused else "")


def model_facts(model: nn.Module, init_line: str | None) -> dict[str, Any]:
    """Class and sizes of the plain model, before wrapping (FSDP2 renames its class)."""
    params = list(model.parameters())
    return {
        "model": type(model).__name__,
        "parameters": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "init_from": init_line,
    }


def data_source(cfg: RunConfig) -> str:
    data = cfg.data
    if data._target_:
        return data._target_
    if not hasattr(data, "path"):  # synthetic: made up from the seed
        return data.name
    return f"{data.name} {data.path}" if data.path else f"{data.name} (default corpus)"


def devices(env: DistEnv) -> str:
    kind = env.device.type
    if kind == "cuda":
        kind = f"cuda ({torch.cuda.get_device_name(env.device)})"
    return f"{env.world_size} x {kind}, {env.backend}"


def evaluation(cfg: RunConfig, data: Data) -> str:
    if data.val is None:
        return "none (no validation data)"
    every = cfg.train.eval_every
    return f"every {every} steps" if every else "at the end"


def run_facts(
    cfg: RunConfig,
    env: DistEnv,
    data: Data,
    model: dict[str, Any],
    batch: tuple[int, int],
    start: tuple[int, Path | None],
) -> dict[str, Any]:
    """Every fact of the summary, JSON-ready. `model`: `model_facts`; `batch`: (micro-batch
    size, accumulation steps) per worker; `start`: (the step it starts from, the checkpoint
    resumed or None)."""
    (micro, accum), (step, resumed) = batch, start
    global_batch, tokens = cfg.train.global_batch_size, data.spec.tokens_per_sample
    ckpt = cfg.checkpoint
    return {
        "run_dir": cfg.train.run_dir,
        "start_step": step,
        "resumed_from": str(resumed) if resumed else None,
        **model,
        "data": data_source(cfg),
        "train_samples": len(data.train),
        "val_samples": len(data.val) if data.val is not None else 0,
        "tokens_per_sample": tokens or None,
        "world_size": env.world_size,
        "micro_batch_size": micro,
        "accumulation_steps": accum,
        "global_batch_size": global_batch,
        "tokens_per_step": global_batch * tokens or None,
        "max_steps": cfg.train.max_steps,
        "epochs": cfg.train.max_steps * global_batch / max(1, len(data.train)),
        "evaluation": evaluation(cfg, data),
        "strategy": describe(cfg.parallel, env.world_size, env.local_world_size),
        "precision": cfg.precision.dtype,
        "devices": devices(env),
        "checkpoint_enabled": ckpt.enabled,
        "checkpoint_every": ckpt.every_steps,
        "keep_last": ckpt.keep_last,
        "checkpoint_best": (
            f"{ckpt.best.metric} ({ckpt.best.mode})" if ckpt.enabled and ckpt.best.metric else None
        ),
        "async": ckpt.async_save,
        "backends": list(dict.fromkeys(["jsonl", *cfg.log.backends])),
    }
