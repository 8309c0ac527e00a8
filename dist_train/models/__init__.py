"""Model registry: built-in models by name, user models by `_target_` import path."""

from __future__ import annotations

import math

from torch import nn

from dist_train.config import call_target
from dist_train.data import DataSpec
from dist_train.errors import ConfigError
from dist_train.models.gpt import GPT
from dist_train.models.simple import CNN, MLP
from dist_train.sections import CNNConfig, GPTConfig, MLPConfig, ModelConfig


def build_model(cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    if cfg._target_:
        return call_target(cfg._target_, "model._target_", "model.kwargs", **cfg.kwargs)
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
