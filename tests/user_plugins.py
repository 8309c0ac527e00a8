"""A user's own model and dataset, plugged in through `_target_` (importable from tests/)."""

from __future__ import annotations

import torch
from torch import nn


class TinyRegressor(nn.Module):
    def __init__(self, in_features: int, hidden: int = 16) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LineDataset(torch.utils.data.Dataset):
    """Map-style: items are (input, target); y = sum(x) / 4."""

    task = "regression"

    def __init__(self, split: str, n: int = 256, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x.sum(1, keepdim=True) / 4

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]
