"""Model registry: built-in models by name, user models by `_target_` import path (a
transformers model class is built from its config; see `hf.py`). What a model may offer the
framework is declared in `protocol.py`."""

from __future__ import annotations

import math

from torch import nn

from dist_train.config.sections import CNNConfig, GPTConfig, MLPConfig, ModelConfig
from dist_train.config.targets import call_target, resolve_target
from dist_train.data.datasets import DataSpec
from dist_train.errors import ConfigError
from dist_train.models.gpt import GPT
from dist_train.models.hf import build_hf_model, is_hf_class, is_pretrained_dir
from dist_train.models.simple import CNN, MLP


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    target = resolve_target(cfg._target_, "model._target_") if cfg._target_ else None
    if is_hf_class(target):
        return build_hf_model(target, cfg, spec)
    if is_pretrained_dir(cfg.init_from):  # its weights could only be read by transformers
        raise ConfigError(
            "model.init_from",
            cfg.init_from,
            "is a save_pretrained folder: set model._target_ to its transformers class "
            "(e.g. transformers.GPT2LMHeadModel)",
        )
    if cfg._target_:
        return call_target(cfg._target_, "model._target_", "model.kwargs", **cfg.kwargs)
    return _build_named(cfg, spec)


def _build_named(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    if isinstance(cfg, GPTConfig):
        if spec.task != "lm":
            raise ConfigError("model.name", cfg.name, f"needs token data, got a {spec.task} task")
        return GPT(
            spec.vocab_size,
            cfg.block_size,
            cfg.n_layer,
            cfg.n_head,
            cfg.n_embd,
            cfg.dropout,
            cfg.bias,
        )
    if spec.task == "lm":
        raise ConfigError("model.name", cfg.name, "cannot model token sequences; use gpt")
    if isinstance(cfg, MLPConfig):
        return MLP(
            math.prod(spec.input_shape), list(cfg.hidden_dims), spec.num_outputs, cfg.dropout
        )
    assert isinstance(cfg, CNNConfig)  # load_config made the section of model.name
    if len(spec.input_shape) != 3:
        raise ConfigError(
            "data.input_shape", list(spec.input_shape), "cnn needs [channels, height, width]"
        )
    return CNN(spec.input_shape, list(cfg.channels), spec.num_outputs, cfg.dropout)


def count_parameters(model: nn.Module) -> int:
    """Parameters counted once each (`parameters()` already skips tied duplicates)."""
    return sum(p.numel() for p in model.parameters())
