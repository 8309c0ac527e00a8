"""The task's training loss: cross-entropy for classification and language modelling, mean
squared error for regression, of a model's output."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from dist_train.data.datasets import DataSpec
from dist_train.models.protocol import logits_of

LossFn = Callable[[Any, torch.Tensor], torch.Tensor]


def build_loss(spec: DataSpec) -> LossFn:
    """The task's loss of a model's output (a tensor, or an object holding `logits`, as
    transformers models return). LM targets come shifted from the data already, so a
    transformers model is never given `labels=` (it would shift them again)."""
    if spec.task == "lm":
        return lambda out, y: F.cross_entropy(logits_of(out).flatten(0, 1), y.flatten())
    if spec.task == "regression":
        return lambda out, y: F.mse_loss(logits_of(out), y)
    return lambda out, y: F.cross_entropy(logits_of(out), y)
