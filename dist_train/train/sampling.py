"""Text from a language model: the end-of-run sample (`train.sample_tokens`) and
`dist-train sample RUN_DIR`, one function for both."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn

from dist_train.config.schema import RunConfig
from dist_train.data.datasets import DataSpec
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.models.protocol import sampler
from dist_train.parallel.precision import Precision
from dist_train.track.metrics import MetricsLogger


def sample_text(
    model: nn.Module,
    spec: DataSpec,
    prompt: str,
    new_tokens: int,
    *,
    seed: int,
    device: torch.device,
    temperature: float = 0.8,
    top_k: int | None = 20,
    autocast: AbstractContextManager[object] | None = None,
) -> tuple[str, int] | None:
    """(prompt + continuation, tokens generated), or None when the model cannot sample (no
    `sample_tokens`, not a causal LM) or the data has no tokenizer. Every rank of a run calls
    it alike (same seed): under FSDP2 each forward pass gathers parameters collectively."""
    sample = sampler(model)  # the model's own, a causal LM's, or none
    if sample is None or spec.encode is None or spec.decode is None:
        return None
    prompt_ids = spec.encode(prompt) or [0]
    ids = torch.tensor([prompt_ids], device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with autocast or nullcontext():
        out = sample(ids, new_tokens, g, temperature=temperature, top_k=top_k)
    generated = out.shape[1] - len(prompt_ids)
    return spec.decode(out[0].tolist()), generated


def end_of_run_sample(
    cfg: RunConfig,
    model: nn.Module,
    spec: DataSpec,
    env: DistEnv,
    precision: Precision,
    logger: MetricsLogger,
) -> str | None:
    """`train.sample_tokens` tokens at the end of a run; every rank samples alike (same seed),
    the main rank prints."""
    if cfg.train.sample_tokens <= 0:
        return None
    sampled = sample_text(
        model,
        spec,
        cfg.train.sample_prompt,
        cfg.train.sample_tokens,
        seed=cfg.train.seed,
        device=env.device,
        autocast=precision.autocast(),
    )
    if sampled is None:
        return None
    text, tokens = sampled
    logger.print(f"--- sample ({tokens} tokens) ---\n{text}\n---")
    return text


def pick_checkpoint(run_dir: Path, which: str) -> Path:
    """`latest` (the newest complete checkpoint), `best` (checkpoint.best's), or a path."""
    from dist_train.checkpoint.files import find_checkpoint

    if which == "best":
        link = run_dir / "checkpoints" / "best"
        if not link.exists():
            raise ConfigError(
                "--checkpoint", which, f"{run_dir} has no best checkpoint (set checkpoint.best)"
            )
        return find_checkpoint(str(link), "--checkpoint")
    return find_checkpoint(str(run_dir) if which == "latest" else which, "--checkpoint")


def load_for_sampling(run_dir: Path, which: str, device: str) -> tuple[nn.Module, DataSpec, Path]:
    """The run's model with a checkpoint's weights, and its data's tokenizer, in one process."""
    from dist_train.checkpoint.export import fill_tied, read_checkpoint_weights
    from dist_train.checkpoint.files import read_manifest
    from dist_train.config.load import load_config
    from dist_train.data.build import build_data
    from dist_train.launch.env import read_env
    from dist_train.models.registry import build_model

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError("run_dir", str(run_dir), "holds no config.yaml: not a dist-train run")
    cfg = load_config(config)
    path = pick_checkpoint(run_dir, which)
    spec = build_data(cfg).spec
    if spec.task != "lm":
        raise ConfigError(
            "run_dir", str(run_dir), f"trained a {spec.task} model; sampling needs token data"
        )
    model = build_model(cfg.model, spec)
    weights = read_checkpoint_weights(path, read_manifest(path), str(path), "--checkpoint")
    model.load_state_dict(fill_tied(weights, model))
    return model.to(read_env(device, environ={}).device).eval(), spec, path
