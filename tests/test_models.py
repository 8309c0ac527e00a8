"""The model protocol: what a model may offer the framework (FSDP units, FLOPs per token,
sampling), and the fallbacks when it offers nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.errors import DistTrainError
from dist_train.models.gpt import GPT
from dist_train.models.protocol import (
    CanSampleTokens,
    HasFlopsPerToken,
    HasFSDPUnits,
    count_flops_per_token,
    flops_per_token,
    fsdp_units,
    logits_of,
    sampler,
)

from helpers import TINY_TEXT, train_in_process
from user_plugins import PlainLM


def test_a_model_offering_nothing_gets_the_fallbacks() -> None:
    model = PlainLM(vocab_size=50, width=16)
    assert fsdp_units(model) == []  # FSDP shards the root only
    assert sampler(model) is None  # no sample, and no error
    tokens = torch.randint(0, 50, (2, 8))
    before = torch.get_rng_state()
    counted = flops_per_token(model, tokens, tokens.numel())
    # every weight matrix: 2 FLOPs per weight forward, 4 backward (input and weight gradient)
    matmul_weights = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)
    )
    assert counted == 6 * matmul_weights
    # counting leaves no trace: no gradients, the RNG where it was, the mode kept
    assert all(p.grad is None for p in model.parameters()) and model.training
    assert torch.equal(torch.get_rng_state(), before)


def test_a_plain_model_trains_with_mfu_and_without_a_sample(tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train_in_process(
        [
            *TINY_TEXT,
            "model._target_=user_plugins.PlainLM",
            "model.kwargs={vocab_size: 512, width: 16}",
            "train.max_steps=4",
            "train.global_batch_size=4",
            "log.every_steps=2",
            "log.peak_tflops=0.5",
            "train.sample_tokens=10",  # asked for, but the model cannot sample: none, no error
            "checkpoint.enabled=false",
            f"train.run_dir={run}",
        ]
    )
    assert result["sample"] is None and result["losses"][4] < result["losses"][2]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in records if "mfu" in r]
    assert len(logged) == 2
    per_token = 6 * (16 * 64 * 2 + 16 * 512)  # its three weight matrices, counted
    for r in logged:
        assert r["mfu"] == pytest.approx(r["tokens_per_sec"] * per_token / 0.5e12, rel=1e-9)


def test_gpt_keeps_its_own_methods_and_the_count_agrees() -> None:
    model = GPT(vocab_size=65, block_size=32, n_layer=2, n_head=2, n_embd=32)
    assert isinstance(model, HasFSDPUnits) and isinstance(model, HasFlopsPerToken)
    assert isinstance(model, CanSampleTokens)
    assert fsdp_units(model) == list(model.blocks)
    sample = torch.randint(0, 65, (2, 32))
    assert flops_per_token(model, sample, 64) == model.flops_per_token()  # its own figure
    # The counter agrees with the analytic figure within 2% (it also counts the attention
    # scores that the flash backward recomputes; the PaLM formula leaves recompute out).
    assert count_flops_per_token(model, sample, 64) == pytest.approx(
        model.flops_per_token(), rel=0.02
    )
    out = sampler(model)(torch.zeros(1, 1, dtype=torch.long), 5, None)  # type: ignore[misc]
    assert out.shape == (1, 6)


def test_outputs_give_their_logits() -> None:
    logits = torch.randn(2, 3)
    assert logits_of(logits) is logits and logits_of({"logits": logits}) is logits

    class Output:  # an output object, as transformers' ModelOutput also is
        def __init__(self, logits: torch.Tensor) -> None:
            self.logits = logits

    assert logits_of(Output(logits)) is logits
    with pytest.raises(DistTrainError, match="without logits"):
        logits_of({"hidden": logits})
