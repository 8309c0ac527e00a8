"""The built-in GPT with the whole model protocol (FSDP units, analytic FLOPs per token,
sampling). Its architecture is `gpt_core`, a pure-torch file that exports ship beside the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from dist_train.models import gpt_core
from dist_train.models.protocol import generate


class GPT(gpt_core.GPT):
    def flops_per_token(self) -> float:
        """Training FLOPs per token (forward + backward = 3 x forward), PaLM appendix B:
        6 per weight of the matmuls (embedding lookups excluded) plus attention's
        12 x layers x width x context."""
        n_layer, n_embd = len(self.blocks), self.wpe.weight.shape[1]
        matmul_params = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6.0 * matmul_params + 12.0 * n_layer * n_embd * self.block_size

    def fsdp_units(self) -> list[nn.Module]:
        """Modules FSDP2 shards one by one (gathered just in time, freed right after)."""
        return list(self.blocks)

    def sample_tokens(
        self,
        prompt: torch.Tensor,
        new_tokens: int,
        generator: torch.Generator | None = None,
        temperature: float = 0.8,
        top_k: int | None = 20,
    ) -> torch.Tensor:
        """Top-k sampling over the last `block_size` tokens (see `protocol.generate`)."""
        return generate(
            self,
            prompt,
            new_tokens,
            generator,
            context=self.block_size,
            temperature=temperature,
            top_k=top_k,
        )
