"""A user dataset for the sweep tests: LineDataset, but each item takes `delay` seconds to read
(a slow disk), so that a short run lasts long enough to be stopped part way, on any machine."""

from __future__ import annotations

import time

import torch

from user_plugins import LineDataset


class SlowLines(LineDataset):
    def __init__(self, split: str, delay: float = 0.005, **kwargs: int) -> None:
        super().__init__(split, **kwargs)
        self.delay = delay

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        time.sleep(self.delay)
        return super().__getitem__(i)
