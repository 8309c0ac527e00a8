"""The world-size-invariant order of samples: which samples make each step's global batch, and
which slice of it a rank takes. A pure function of (seed, step), so resumes and a different
number of workers continue the same order."""

from __future__ import annotations

import torch


class GlobalBatchSampler:
    """Global batch at `step` = positions [step*B, (step+1)*B) of an endless stream of epochs,
    each epoch a permutation seeded by (seed, epoch): a pure function of (seed, step)."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int) -> None:
        self.num_samples, self.global_batch_size, self.seed = num_samples, global_batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:  # one randperm per epoch, not per step
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=g)
        return self._perm

    def global_indices(self, step: int) -> torch.Tensor:
        start, n = step * self.global_batch_size, self.num_samples
        parts, pos = [], start
        while pos < start + self.global_batch_size:
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + self.global_batch_size - pos)
            parts.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rank_indices(self, step: int, rank: int, world_size: int) -> torch.Tensor:
        per_rank = self.global_batch_size // world_size
        return self.global_indices(step)[rank * per_rank : (rank + 1) * per_rank]
