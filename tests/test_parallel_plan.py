"""The plan's per-rank memory estimate for each strategy, and how the run names its strategy:
fast, in this process (the multi-process training of each strategy is in test_strategies.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_train.config.load import load_config
from dist_train.config.schema import ParallelConfig
from dist_train.parallel.memory import measure_activations
from dist_train.parallel.wrap import describe
from dist_train.train.plan import Plan, build_plan

from conftest import cli
from helpers import TINY_GPT

RUN = [*TINY_GPT, "train.global_batch_size=8", "model.n_layer=4", "optim.name=adamw"]


def rows(plan: Plan) -> dict[str, dict[str, float | None]]:
    return {m.strategy: vars(m) for m in plan.memory}


def test_estimates_shard_what_each_strategy_shards() -> None:
    plan = build_plan(load_config(None, RUN), 4, 2)  # 2 nodes of 2: hsdp shards over 2
    p, est = plan.parameters, rows(plan)
    assert [m.strategy for m in plan.memory] == ["ddp", "zero2", "fsdp", "hsdp"]
    # DDP: whole fp32 weights, gradients and their all-reduce buckets, AdamW's two moments.
    assert (est["ddp"]["parameters"], est["ddp"]["gradients"]) == (4 * p, 8 * p)
    assert est["ddp"]["optimizer"] == 8 * p
    assert est["zero2"]["optimizer"] == est["fsdp"]["optimizer"] == 8 * p / 4
    assert est["hsdp"]["optimizer"] == 8 * p / 2 and est["hsdp"]["shard_size"] == 2
    # zero2 holds every block gathered at the peak; fsdp one block (+ the prefetched next).
    assert est["fsdp"]["parameters"] < est["zero2"]["parameters"] < est["ddp"]["parameters"] + 4 * p
    activations = {e["activations"] for e in est.values()}
    assert len(activations) == 1 and activations.pop() > 0  # the same micro-batch everywhere
    assert plan.state_bytes_per_rank == 20 * p  # ddp, this run's: everything but activations
    assert "<- this run" in next(line for line in plan.format().splitlines() if "    ddp " in line)


def test_one_worker_has_only_none() -> None:
    plan = build_plan(load_config(None, RUN), 1)
    assert [m.strategy for m in plan.memory] == ["none"]
    assert plan.memory[0].gradients == 4 * plan.parameters  # no buckets without DDP


def test_activation_checkpointing_estimate() -> None:
    def act(mode: str) -> float:
        plan = build_plan(load_config(None, [*RUN, f"parallel.activation_checkpointing={mode}"]), 2)
        value = plan.memory[0].activations
        assert value is not None
        return value

    none, full, every_2 = act("none"), act("full"), act("every_n")
    assert full < every_2 < none


def test_cpu_offload_moves_the_sharded_state_to_host() -> None:
    overrides = [*RUN, "parallel.strategy=fsdp"]
    on = rows(build_plan(load_config(None, [*overrides, "parallel.cpu_offload=true"]), 2))
    off = rows(build_plan(load_config(None, overrides), 2))
    assert on["fsdp"]["optimizer"] == 0 and on["fsdp"]["host"] > 0
    assert off["fsdp"]["host"] == 0
    assert on["fsdp"]["host"] == pytest.approx(
        off["fsdp"]["optimizer"] + 2 * 4 * count_of(overrides) / 2
    )


def count_of(overrides: list[str]) -> int:
    return build_plan(load_config(None, overrides), 2).parameters


class Blocks(nn.Module):
    """Two blocks of one Linear + tanh: each saves its input (for the weight gradient) and its
    output (for tanh's gradient)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))

    def fsdp_units(self) -> list[nn.Module]:
        return list(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def test_activations_counted_on_the_meta_device() -> None:
    with torch.device("meta"):
        model = Blocks()
    x, y = torch.zeros(4, 8), torch.zeros(4, 8)
    act = measure_activations(model, (x, y), nn.functional.mse_loss)
    row = 4 * 8 * 4  # one (4, 8) fp32 tensor
    # Each block saves its input (for the weight gradient) and tanh's output; the second
    # block's input is the first one's output, the same tensor, counted once.
    assert act.inside == [2 * row, row]
    assert act.inputs == [row, row]
    assert act.held([]) == act.outside + 3 * row
    # Recomputed blocks keep their inputs, and one block's insides while it is recomputed.
    assert act.held([0, 1]) == act.outside + 2 * row + 2 * row
    assert act.held([1]) == act.outside + 2 * row + row + row


def test_describe_names_the_layout() -> None:
    hsdp = ParallelConfig(strategy="hsdp", shard_size=2, activation_checkpointing="full")
    assert (
        describe(hsdp, 4, 4) == "hsdp (2 replicas x 2 shards), activation checkpointing every block"
    )
    zero2 = ParallelConfig(strategy="zero2", cpu_offload=True)
    assert describe(zero2, 2, 2) == "zero2 (2 shards), cpu offload"
    assert describe(ParallelConfig(), 1, 1) == "none"


def test_check_prints_the_table(tmp_path: object) -> None:
    out = cli(
        "check",
        "configs/quickstart.yaml",
        *RUN,
        "parallel.strategy=hsdp",
        "parallel.shard_size=1",
        "--nproc",
        "2",
    )
    assert out.returncode == 0, out.stderr
    table = out.stdout[out.stdout.index("memory per rank") :].splitlines()
    assert table[1].split() == ["strategy", "params", "grads", "optimizer", "activations", "total"]
    hsdp = next(line for line in table if line.strip().startswith("hsdp"))
    assert hsdp.endswith("<- this run")
