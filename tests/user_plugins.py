"""A user's own model and dataset, plugged in through `_target_` (importable from tests/)."""

from __future__ import annotations

import os

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


class CrashOnRankOne(nn.Module):
    """Raises in the forward of rank 1 after `after` calls: a worker that dies mid-run."""

    def __init__(self, in_features: int, after: int = 3) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 1)
        self.after, self.calls = after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls > self.after:
            raise RuntimeError("simulated worker crash")
        return self.linear(x)


class DieInSaveOnRankOne(TinyRegressor):
    """Rank 1's process is killed (SIGKILL, as the out-of-memory killer would) inside the first
    checkpoint save after `after` forward calls: a peer lost during a save."""

    def __init__(self, in_features: int, after: int = 2) -> None:
        super().__init__(in_features)
        self.after, self.calls = after, 0
        self.register_state_dict_pre_hook(self._die_on_rank_one)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return super().forward(x)

    def _die_on_rank_one(self, *_: object) -> None:
        if os.environ.get("RANK") == "1" and self.calls > self.after:
            import signal

            os.kill(os.getpid(), signal.SIGKILL)


class PoisonedLineDataset(LineDataset):
    """LineDataset with one NaN input at index `bad`: a corrupted record in real data."""

    def __init__(self, split: str, bad: int = 5, **kwargs: int) -> None:
        super().__init__(split, **kwargs)
        if split == "train":
            self.x[bad, 0] = float("nan")


class Exploding(nn.Module):
    """A user model whose constructor rejects its arguments."""

    def __init__(self, width: int = 3) -> None:
        super().__init__()
        raise ValueError(f"width must be even, got {width}")


class TorchvisionStyle(LineDataset):
    """A dataset written the torchvision way: `train=True`, no `split=`."""

    def __init__(self, train: bool = True) -> None:  # type: ignore[override]
        super().__init__("train" if train else "val")


class StallOnRankOne(LineDataset):
    """Rank 1 stops answering after `after` items of the training split: a dataset reading
    from a mount that hung."""

    def __init__(self, split: str, after: int = 64, **kwargs: int) -> None:
        super().__init__(split, **kwargs)
        self.after = after if split == "train" else -1
        self.calls = 0

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        if os.environ.get("RANK") == "1" and self.calls > self.after >= 0:
            import time

            time.sleep(3600)
        return super().__getitem__(i)


class SlowToBuild(LineDataset):
    """Takes `seconds` to construct (a dataset indexing files at start-up)."""

    def __init__(self, split: str, seconds: float = 5.0, **kwargs: int) -> None:
        import time

        time.sleep(seconds)
        super().__init__(split, **kwargs)


def double_target(item: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-sample transform (`data.transform`)."""
    x, y = item
    return x, 2 * y


class StackWithMarker:
    """A collate class (`data.collate`): stacks, and adds 100 to the targets so a test sees it
    was used."""

    def __call__(
        self, items: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = zip(*items, strict=True)
        return torch.stack(xs), torch.stack(ys) + 100


def jitter(item: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A random augmentation drawing from torch's global RNG, as torchvision's do."""
    x, y = item
    return x + torch.rand(x.shape), y


class PlainLM(nn.Module):
    """A token model offering nothing of the model protocol (no FSDP units, no
    FLOPs figure, no sampling) and returning a dict with `logits`, as some libraries do."""

    def __init__(self, vocab_size: int, width: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )
        self.head = nn.Linear(width, vocab_size)

    def forward(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.head(self.mlp(self.embed(idx)))}


class MarkerSequences(torch.utils.data.Dataset):
    """Token sequences labeled by the marker token (id 0..classes-1) they start with, where
    BERT keeps its [CLS] token, among random filler: sequence classification that a tiny BERT
    learns in a few dozen steps."""

    task = "classification"

    def __init__(
        self, split: str, n: int = 256, length: int = 12, vocab: int = 24, classes: int = 3
    ) -> None:
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        self.x = torch.randint(classes, vocab, (n, length), generator=g)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x[:, 0] = self.y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class IndexedSamples(torch.utils.data.Dataset):
    """Regression samples whose target is their own index: a metric can see which samples an
    evaluation counted, and how often."""

    task = "regression"

    def __init__(self, split: str, n: int = 10) -> None:
        self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(len(split)))
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], torch.tensor([float(i)])


class SampleCounter:
    """A user metric (`train.metrics`): how many samples, and the sums of their ids and squared
    ids (each sample counted once gives n, n(n-1)/2 and (n-1)n(2n-1)/6)."""

    names = ("count", "id_sum", "id_squares")  # declared: a watch on one is checked up front

    def update(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ids = target.flatten().double()
        return torch.stack(
            [torch.tensor(float(len(ids)), dtype=torch.float64), ids.sum(), (ids**2).sum()]
        )

    def compute(self, sums: torch.Tensor) -> dict[str, float]:
        count, total, squares = sums.tolist()
        return {"count": count, "id_sum": total, "id_squares": squares}


class UpdateWithoutTarget:
    """A user metric whose update forgot the target argument."""

    def update(self, output: torch.Tensor) -> torch.Tensor:
        return output.sum().view(1)

    def compute(self, sums: torch.Tensor) -> dict[str, float]:
        return {"sum": sums.item()}


class SlowLines(LineDataset):
    """Each item takes at least `seconds` to read (a slow disk): a lower bound a test can rely
    on, whatever the machine's load."""

    def __init__(self, split: str, seconds: float = 0.01, **kwargs: int) -> None:
        super().__init__(split, **kwargs)
        self.seconds = seconds

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        import time

        time.sleep(self.seconds)
        return super().__getitem__(i)
