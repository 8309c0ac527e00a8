"""Small non-sequence models: an MLP and a CNN, for synthetic tasks and tests."""

from __future__ import annotations

import math

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(
        self, in_features: int, hidden_dims: list[int], out_features: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden_dims:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(dropout)]
            width = h
        layers.append(nn.Linear(width, out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    """Conv-GELU-pool stages then a linear head; input (batch, channels, height, width)."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        channels: list[int],
        out_features: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        in_ch = input_shape[0]
        layers: list[nn.Module] = []
        for ch in channels:
            layers += [
                nn.Conv2d(in_ch, ch, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            in_ch = ch
        spatial = [math.ceil(s / 2 ** len(channels)) for s in input_shape[1:]]
        layers += [
            nn.Flatten(),
            nn.Dropout(dropout),
            nn.Linear(in_ch * math.prod(spatial), out_features),
        ]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
