"""What a model may offer the framework, and what the framework does when it does not.

Each capability is one small protocol with a distinct method name (HF models already have a
`generate` of their own, with another signature, so ours is `sample_tokens`). The trainer and
the parallel code call only the functions below, never a concrete model class:

- `fsdp_units(model)`: the model's `fsdp_units()`; else the submodules whose class a
  transformers model names in `_no_split_modules`; else none (FSDP shards the root only).
- `flops_per_token(model, sample, tokens)`: the model's `flops_per_token()`; else counted once
  with `FlopCounterMode` on one sample forward + backward, so MFU works for any model.
- `sampler(model)`: the model's `sample_tokens`; else, for a transformers causal LM, our own
  top-k loop over its logits; else none (no sample is printed).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from dist_train.errors import DistTrainError
from dist_train.models.hf import causal_lm_context

Sampler = Callable[[torch.Tensor, int, torch.Generator | None], torch.Tensor]


@runtime_checkable
class HasFSDPUnits(Protocol):
    def fsdp_units(self) -> list[nn.Module]:
        """Submodules FSDP2 shards one by one (gathered just in time, freed right after)."""
        ...


@runtime_checkable
class HasFlopsPerToken(Protocol):
    def flops_per_token(self) -> float:
        """Training FLOPs (forward + backward) per token, for the `mfu` metric."""
        ...


@runtime_checkable
class CanSampleTokens(Protocol):
    def sample_tokens(
        self,
        prompt: torch.Tensor,
        new_tokens: int,
        generator: torch.Generator | None = None,
        temperature: float = 0.8,
        top_k: int | None = 20,
    ) -> torch.Tensor:
        """`prompt` (1, t) token ids -> (1, t + new_tokens); every rank calls it alike."""
        ...


def logits_of(output: Any) -> torch.Tensor:
    """A model's output as the logits the loss takes: a tensor itself, else the `logits` of a
    dict or an output object (a transformers `ModelOutput` is both)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = (
        output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    )
    if logits is None:
        raise DistTrainError(
            f"the model returned a {type(output).__name__} without logits; return a tensor, "
            "or a dict or object with a `logits` entry"
        )
    return logits


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    if isinstance(model, HasFSDPUnits):
        return model.fsdp_units()
    return declared_blocks(model)


def declared_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost submodules whose class is named in `_no_split_modules` (what transformers
    models declare as their blocks). A block holding a parameter that is also used outside it
    (tied weights) stays with the root: FSDP2 cannot shard one tensor into two units."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        return []
    blocks: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        nested = any(name.startswith(outer + ".") for outer, _ in blocks)
        if module is not model and type(module).__name__ in names and not nested:
            blocks.append((name, module))
    all_params = list(model.named_parameters(remove_duplicate=False))

    def tied_outside(prefix: str, block: nn.Module) -> bool:
        inside = {id(p) for p in block.parameters()}
        return any(id(p) in inside for n, p in all_params if not n.startswith(prefix + "."))

    return [block for name, block in blocks if not tied_outside(name, block)]


def _cpu_attention(query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return sdpa_flop_count(query, key, value)


def _cpu_attention_backward(grad: Any, query: Any, key: Any, value: Any, *_: Any, **__: Any) -> int:
    return sdpa_backward_flop_count(grad, query, key, value)


# torch's counter knows the CUDA attention kernels but not the CPU flash kernel that
# `scaled_dot_product_attention` runs on CPU: without these, attention would count as zero there.
_CPU_ATTENTION = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward,
}


def flops_per_token(model: nn.Module, sample: torch.Tensor, tokens: int) -> float:
    """Training FLOPs per token: the model's own figure, else counted on `sample` (a batch
    holding `tokens` tokens, on the model's device)."""
    if isinstance(model, HasFlopsPerToken):
        return float(model.flops_per_token())
    return count_flops_per_token(model, sample, tokens)


def count_flops_per_token(model: nn.Module, sample: torch.Tensor, tokens: int) -> float:
    """One forward + backward under `FlopCounterMode`, leaving no trace: eval mode (no
    batch-norm statistics move; the matmuls are the same), the RNG state restored, and
    `autograd.grad` instead of `backward` so no `.grad` is written. Frozen parameters get no
    weight gradient, as in training."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    was_training = model.training
    model.eval()
    devices = [sample.device] if sample.device.type == "cuda" else []
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION)
    try:
        with torch.random.fork_rng(devices=devices), counter:
            total = logits_of(model(sample)).float().sum()
            if trainable and total.requires_grad:
                torch.autograd.grad(total, trainable, allow_unused=True)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / tokens


def sampler(model: nn.Module) -> Sampler | None:
    if isinstance(model, CanSampleTokens):
        return model.sample_tokens
    context = causal_lm_context(model)
    return partial(generate, model, context=context) if context else None


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    new_tokens: int,
    generator: torch.Generator | None = None,
    *,
    context: int,
    temperature: float = 0.8,
    top_k: int | None = 20,
) -> torch.Tensor:
    """Autoregressive top-k sampling for any model whose output holds (B, T, vocab) logits,
    over the last `context` tokens. Restores the model's mode. No key/value cache: the
    samples are short, and it works alike for every model and under FSDP2."""
    was_training = model.training
    model.eval()
    idx = prompt
    for _ in range(new_tokens):
        logits = logits_of(model(idx[:, -context:]))[:, -1, :] / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits.float(), dim=-1)
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=generator)], dim=1)
    model.train(was_training)
    return idx
