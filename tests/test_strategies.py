"""parallel.strategy zero2 and hsdp, parallel.activation_checkpointing, parallel.cpu_offload
(#23): every strategy trains like one process (fp32), stops and resumes bitwise, resumes under
another strategy and world size; HSDP's 2-D mesh, zero2's blocks gathered from forward to
backward, recomputation that really recomputes, offload, compile and a transformers model.

Each rank function trains several configurations one after the other in the same processes
(`train_several`): a fresh process costs seconds of imports, a run on these sizes about one."""

from __future__ import annotations

import math
import os
import shutil
import socket
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dist_train.config.load import load_config
from dist_train.data.build import build_data
from dist_train.models.registry import build_model
from dist_train.parallel.recompute import recomputed_units

from conftest import cli, run_on_ranks
from helpers import (
    EXACT_RUN,
    OPTIMIZERS,
    TINY_TEXT,
    assert_same_training,
    train_in_process,
)

STEPS = 20
# fp32, dropout 0, every step logged (helpers.EXACT_RUN); SGD shows a gradient summed instead
# of averaged (over ranks, replicas or micro-batches), and clipping at 1.0 (active on some of
# these steps, not all) needs the global norm of sharded gradients.
EXACT = [*EXACT_RUN, *OPTIMIZERS["sgd"], f"train.max_steps={STEPS}", "checkpoint.enabled=false"]
HSDP = ["parallel.strategy=hsdp", "parallel.shard_size=2"]  # 4 ranks: 2 replicas x 2 shards
FULL = "parallel.activation_checkpointing=full"
EVERY_N = "parallel.activation_checkpointing=every_n"  # every 2nd block: block 0 of 2

Run = tuple[list[str], int | None]  # overrides, stop_at
Probe = Callable[[Any], Any]  # train_in_process(probe=...): a module-level function (pickled)


def distinct_ports(n: int) -> list[int]:
    """`n` different free ports, one per training in the same rank processes: on a shared
    one, a rank still leaving the last group can meet the next (see test_hf_models)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]


def train_several(runs: list[Run], ports: list[int], probe: Probe | None) -> list[dict[str, Any]]:
    """On each rank: the runs in order, each in a process group of its own, probed."""
    results = []
    for (overrides, stop_at), port in zip(runs, ports, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        results.append(train_in_process(overrides, stop_at, probe=probe))
    return results


def on_ranks(
    world_size: int, runs: list[Run], probe: Probe | None = None
) -> list[list[dict[str, Any]]]:
    """run -> rank -> result (`probe`: `watch` by default)."""
    probe = probe or watch
    by_rank = run_on_ranks(train_several, world_size, runs, distinct_ports(len(runs)), probe)
    return [list(results) for results in zip(*by_rank, strict=True)]


def watch(trainer: Any) -> dict[str, Any]:
    """Hooks on the model a trainer is about to train, and what they see (filled in while it
    trains): forward calls of each block (FSDP unit) with autograd on, that is in training,
    recomputations included (evaluation runs under no_grad); whether each block's parameters
    were still gathered (plain tensors, not the sharded DTensors) once the whole model's forward
    was over (the first time), and as each training forward began; the sharding of the first block's first parameter, its mesh's process groups, and
    this rank's local part of it after the last optimizer step; FSDP2's offload policies."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from dist_train.models.protocol import fsdp_units
    from dist_train.parallel.wrap import unwrap

    model = unwrap(trainer.model)
    # Once sharded, a transformers block's class is FSDP<its class>: no longer the name that
    # _no_split_modules gives; the sharded submodules are the units then.
    units = fsdp_units(model) or [
        m for m in model.modules() if isinstance(m, FSDPModule) and m is not model
    ]
    seen: dict[str, Any] = {
        "forwards": [0] * len(units),
        "gathered_after_forward": None,
        "gathered_before_forward": [],
    }

    def counter(i: int) -> Any:
        def count(module: torch.nn.Module, args: Any) -> None:
            if torch.is_grad_enabled():
                seen["forwards"][i] += 1

        return count

    for i, unit in enumerate(units):
        unit.register_forward_pre_hook(counter(i))

    def after_forward(module: torch.nn.Module, args: Any, output: Any) -> None:
        if torch.is_grad_enabled() and seen["gathered_after_forward"] is None:
            seen["gathered_after_forward"] = [
                not isinstance(next(u.parameters()), DTensor) for u in units
            ]

    def before_forward(module: torch.nn.Module, args: Any) -> None:
        if torch.is_grad_enabled():
            gathered = [not isinstance(next(u.parameters()), DTensor) for u in units]
            seen["gathered_before_forward"].append(all(gathered))

    model.register_forward_hook(after_forward)
    model.register_forward_pre_hook(before_forward)
    first = next(units[0].parameters())  # at rest: the sharded parameter the optimizer updates
    seen["name"] = next(n for n, p in model.named_parameters() if p is first)
    if isinstance(first, DTensor):
        mesh = first.device_mesh
        seen["mesh_dims"] = mesh.mesh_dim_names
        seen["placements"] = tuple(first.placements)
        dims = mesh.mesh_dim_names or (None,)
        seen["groups"] = {
            d: dist.get_process_group_ranks((mesh[d] if d else mesh).get_group()) for d in dims
        }

    # The offload policy each FSDP2 unit was given (none: not sharded): on a CPU run nothing
    # moves, so this is where cpu_offload shows.
    sharded = [m for m in [*units, model] if isinstance(m, FSDPModule)]
    seen["offload"] = {
        type(m._get_fsdp_state()._fsdp_param_group.offload_policy).__name__ for m in sharded
    }

    def keep_local(*_: Any) -> None:
        local = first.to_local() if isinstance(first, DTensor) else first
        seen["local"] = local.detach().clone()

    trainer.optimizer.register_step_post_hook(keep_local)
    return seen


def unprobed(trainer: Any) -> None:
    """No hooks at all."""


def compiled_blocks(trainer: Any) -> list[bool]:
    """Whether each block was compiled in place (`nn.Module.compile`), looked at only."""
    from dist_train.models.protocol import fsdp_units
    from dist_train.parallel.wrap import unwrap

    blocks = fsdp_units(unwrap(trainer.model))
    return [getattr(b, "_compiled_call_impl", None) is not None for b in blocks]


def later(ref: dict[str, Any], first: int) -> dict[str, Any]:
    """An uninterrupted run as a resume from step `first - 1` sees it."""
    return {
        **ref,
        "losses": {s: v for s, v in ref["losses"].items() if s >= first},
        "val": {s: v for s, v in ref["val"].items() if s >= first},
    }


# name: overrides on 4 ranks of global batch 8 (micro-batch 1: two micro-batches per step).
# Each strategy, both recompute modes, accumulation under zero2 and hsdp, hsdp without either.
EQUIVALENT = {
    "ddp": ["parallel.strategy=ddp", "train.micro_batch_size=2"],
    "zero2_full_accum": ["parallel.strategy=zero2", FULL, "train.micro_batch_size=1"],
    "fsdp_every_n": ["parallel.strategy=fsdp", EVERY_N, "train.micro_batch_size=2"],
    "hsdp": [*HSDP, "train.micro_batch_size=2"],
    "hsdp_full_accum": [*HSDP, FULL, "train.micro_batch_size=1"],
}


@pytest.mark.slow
@pytest.mark.distributed
def test_every_strategy_trains_like_one_process_on_4_ranks(tmp_path: Path) -> None:
    """ddp = zero2 = fsdp = hsdp (2 x 2) = 1 process over 20 steps (losses, validation and
    final weights within 1e-5 relative), with and without accumulation and recomputation.
    Each rank also shows its strategy's layout: zero2 keeps the blocks gathered after forward
    (fsdp and hsdp do not), hsdp shards within {0,1} and {2,3} and replicates across {0,2} and
    {1,3}, and recomputed blocks run their forward twice per micro-batch."""
    from torch.distributed.tensor import Replicate, Shard

    torch.set_num_threads(1)
    single = train_in_process([*EXACT, f"train.run_dir={tmp_path}/single"], probe=watch)
    names = list(EQUIVALENT)
    runs = on_ranks(
        4, [([*EXACT, *EQUIVALENT[n], f"train.run_dir={tmp_path}/{n}"], None) for n in names]
    )
    assert single["losses"][STEPS] < single["losses"][1]  # it trains at all
    assert single["probe"]["forwards"] == [STEPS, STEPS]
    for name, ranks in zip(names, runs, strict=True):
        strategy = name.split("_")[0]
        accum = 2 if name.endswith("accum") else 1
        again = [2, 2] if "full" in name else [2, 1] if "every_n" in name else [1, 1]
        for rank, run in enumerate(ranks):
            where = (name, rank)
            assert_same_training(single, run)
            assert run["params"].keys() == single["params"].keys(), where  # names unchanged
            seen = run["probe"]
            assert seen["forwards"] == [STEPS * accum * a for a in again], where
            if strategy == "ddp":
                assert run["wrapper"] == "DistributedDataParallel", where
                assert run["local_numel"] == run["numel"], where
                continue
            assert run["wrapper"] == "FSDPGPT", where
            # zero2: no reshard after forward, so no second all-gather in backward; nor after
            # the backward of a micro-batch before the last (none in its next forward)
            assert seen["gathered_after_forward"] == [strategy == "zero2"] * 2, where
            # (the first after the evaluation at step 12 too: a forward with no backward)
            zero2 = strategy == "zero2"
            kept = [
                [zero2 and s == 13, zero2][i] for s in range(1, STEPS + 1) for i in range(accum)
            ]
            assert seen["gathered_before_forward"] == kept, where
            share = run["local_numel"] / run["numel"]
            if strategy == "hsdp":
                assert seen["mesh_dims"] == ("replicate", "shard"), where
                assert seen["placements"] == (Replicate(), Shard(0)), where
                groups = {"replicate": [rank % 2, rank % 2 + 2], "shard": [rank // 2 * 2] * 2}
                groups["shard"][1] += 1  # {0,1} or {2,3}
                assert seen["groups"] == groups, where
                assert 0.45 < share < 0.55, where  # half of every parameter: 2 shards
            else:
                assert seen["mesh_dims"] is None and seen["placements"] == (Shard(0),), where
                assert seen["groups"] == {None: [0, 1, 2, 3]}, where
                assert 0.2 < share < 0.3, where  # a quarter: 4 shards
    # hsdp's trained local shards: equal across replicas, the two halves within a replica
    for name in ("hsdp", "hsdp_full_accum"):
        local = [run["probe"]["local"] for run in runs[names.index(name)]]
        full = single["params"][runs[names.index(name)][0]["probe"]["name"]]
        assert torch.equal(local[0], local[2]) and torch.equal(local[1], local[3]), name
        torch.testing.assert_close(torch.cat(local[:2])[: len(full)], full, rtol=1e-5, atol=1e-6)


def test_recomputed_blocks_run_their_forward_twice(tmp_path: Path) -> None:
    """One process, 3 blocks, 2 micro-batches per step: `full` runs every block's forward
    again in backward, `every_n` (n=2) blocks 0 and 2 only, `none` none; the losses, weights
    and parameter names stay those of the run without recomputation."""
    steps = 4
    base = [
        *EXACT_RUN,
        "model.n_layer=3",
        f"train.max_steps={steps}",
        "train.micro_batch_size=4",
        "checkpoint.enabled=false",
    ]
    runs = {
        mode: train_in_process(
            [
                *base,
                f"parallel.activation_checkpointing={mode}",
                f"train.run_dir={tmp_path}/{mode}",
            ],
            probe=watch,
        )
        for mode in ("none", "full", "every_n")
    }
    once = steps * 2
    expected = {"none": [once] * 3, "full": [2 * once] * 3, "every_n": [2 * once, once, 2 * once]}
    for mode, run in runs.items():
        assert run["probe"]["forwards"] == expected[mode], mode
        assert run["params"].keys() == runs["none"]["params"].keys(), mode
        assert_same_training(runs["none"], run, rel=1e-6)
    # which blocks, for other n (no training needed)
    cfg = load_config(None, [*base, "parallel.activation_checkpointing=every_n"])
    model = build_model(cfg.model, build_data(cfg).spec)
    for every, blocks in ((1, [0, 1, 2]), (2, [0, 2]), (3, [0]), (5, [0])):
        cfg.parallel.activation_checkpointing_every = every
        assert recomputed_units(model, cfg.parallel) == [model.blocks[i] for i in blocks], every


# Bitwise resume: dropout on (each rank's RNG, and the recomputation's replay of it), AdamW (its
# sharded moments come back from the checkpoint).
RESUMABLE = [
    *EXACT_RUN,
    *OPTIMIZERS["adamw"],
    "model.dropout=0.1",
    "train.max_steps=12",
    "train.eval_every=6",
    "checkpoint.every_steps=6",
]


def stop_and_resume(tmp_path: Path, world_size: int, strategies: dict[str, list[str]]) -> None:
    """Per strategy, on `world_size` ranks: an uninterrupted run, one stopped after step 6,
    and its resume, which must end exactly as the first (every loss from step 7, the
    validation loss, every weight)."""
    runs: list[Run] = []
    for name, extra in strategies.items():
        run = [*RESUMABLE, *extra]
        runs += [
            ([*run, f"train.run_dir={tmp_path}/{name}_full"], None),
            ([*run, f"train.run_dir={tmp_path}/{name}_cut"], 6),
            ([*run, f"train.run_dir={tmp_path}/{name}_cut"], None),
        ]
    results = on_ranks(world_size, runs, probe=unprobed)
    for i, name in enumerate(strategies):
        full, cut, resumed = results[3 * i : 3 * i + 3]
        for rank in range(world_size):
            where = (name, rank)
            assert cut[rank] == {"stopped_at": 6}, where
            assert sorted(resumed[rank]["losses"]) == list(range(7, 13)), where
            assert resumed[rank]["losses"] == later(full[rank], 7)["losses"], where  # exact
            assert resumed[rank]["val"] == {12: full[rank]["val"][12]}, where
            for key, tensor in full[rank]["params"].items():
                assert torch.equal(resumed[rank]["params"][key], tensor), (*where, key)


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_and_resume_is_bitwise_on_4_ranks(tmp_path: Path) -> None:
    """zero2 and hsdp (2 x 2) with every block recomputed, and ddp: its first step after a
    resume would all-reduce in the constructor's bucket order, the uninterrupted run in the
    order DDP rebuilt after its first step (gloo's sum over more than 2 ranks follows a
    gradient's place in the bucket), were the buckets not settled first (`settle_buckets`)."""
    stop_and_resume(
        tmp_path,
        4,
        {
            "zero2": ["parallel.strategy=zero2", FULL],
            "hsdp": [*HSDP, FULL],
            "ddp": ["parallel.strategy=ddp"],
        },
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_stop_and_resume_is_bitwise_under_ddp_and_fsdp(tmp_path: Path) -> None:
    """2 ranks (one process: tests/test_checkpoint.py)."""
    stop_and_resume(
        tmp_path, 2, {"ddp": ["parallel.strategy=ddp"], "fsdp": ["parallel.strategy=fsdp", EVERY_N]}
    )


@pytest.mark.slow
@pytest.mark.distributed
def test_resume_across_strategies_and_world_sizes(tmp_path: Path) -> None:
    """Stopped after step 6 and resumed under another strategy: fsdp -> zero2 and
    ddp -> hsdp (2 x 2) on 4 ranks, hsdp on 4 ranks -> ddp on 2 (a 2-D sharded checkpoint into
    whole copies on half the workers). Each goes on with the same data and the losses and
    weights of one uninterrupted process."""
    run = [*EXACT_RUN, *OPTIMIZERS["sgd"], "train.max_steps=12", "checkpoint.every_steps=6"]
    torch.set_num_threads(1)
    ref = train_in_process([*run, f"train.run_dir={tmp_path}/ref"])
    h, f, d = (f"train.run_dir={tmp_path}/{x}" for x in ("hsdp", "fsdp", "ddp"))
    hsdp_cut, fsdp_cut, ddp_cut, fsdp_to_zero2, ddp_to_hsdp = on_ranks(
        4,
        [
            ([*run, *HSDP, h], 6),
            ([*run, "parallel.strategy=fsdp", f], 6),
            ([*run, "parallel.strategy=ddp", d], 6),
            ([*run, "parallel.strategy=zero2", f], None),
            ([*run, *HSDP, d], None),
        ],
    )
    (hsdp_to_ddp,) = on_ranks(2, [([*run, "parallel.strategy=ddp", h], None)], unprobed)
    for cut in (hsdp_cut, fsdp_cut, ddp_cut):
        assert all(r == {"stopped_at": 6} for r in cut)
    expected = later(ref, 7)
    for name, ranks in (
        ("fsdp->zero2", fsdp_to_zero2),
        ("ddp->hsdp", ddp_to_hsdp),
        ("hsdp4->ddp2", hsdp_to_ddp),
    ):
        for rank, resumed in enumerate(ranks):
            assert sorted(resumed["losses"]) == list(range(7, 13)), (name, rank)
            assert_same_training(expected, resumed)
    assert [r["wrapper"] for r in hsdp_to_ddp] == ["DistributedDataParallel"] * 2
    for rank, resumed in enumerate(ddp_to_hsdp):  # really resumed as 2 x 2
        assert resumed["probe"]["mesh_dims"] == ("replicate", "shard"), rank
        assert 0.45 < resumed["local_numel"] / resumed["numel"] < 0.55, rank
    assert [r["probe"]["gathered_after_forward"] for r in fsdp_to_zero2] == [[True, True]] * 4
    # The checkpoint the 2 x 2 hsdp run wrote last exports the one-process weights.
    out = tmp_path / "from_hsdp.safetensors"
    assert cli("export", f"{tmp_path}/ddp", "--out", str(out)).returncode == 0
    exported = load_file(out)
    assert exported and set(exported) <= set(ref["params"])
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, ref["params"][name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.distributed
def test_cpu_offload_trains_like_without(tmp_path: Path) -> None:
    """parallel.cpu_offload=true (sharded state and its update in host memory) reaches FSDP2
    and, on a CPU run, trains fsdp exactly as without it; so does zero2 with recomputation."""
    base = [*EXACT, "train.max_steps=12", "train.micro_batch_size=2"]
    offload = "parallel.cpu_offload=true"
    configs = {
        "fsdp": ["parallel.strategy=fsdp"],
        "offload": ["parallel.strategy=fsdp", offload],
        "zero2": ["parallel.strategy=zero2", offload, FULL],
    }
    fsdp, fsdp_offload, zero2 = on_ranks(
        2,
        [([*base, *extra, f"train.run_dir={tmp_path}/{n}"], None) for n, extra in configs.items()],
    )
    assert fsdp[0]["losses"][12] < fsdp[0]["losses"][1]
    for rank in range(2):
        assert fsdp[rank]["probe"]["offload"] == {"OffloadPolicy"}  # the default: none
        for run in (fsdp_offload[rank], zero2[rank]):
            assert run["probe"]["offload"] == {"CPUOffloadPolicy"}, rank
            assert_same_training(fsdp[rank], run)
            assert run["devices"] == {"cpu"} and run["meshes"] == {"cpu"}
            assert 0.45 < run["local_numel"] / run["numel"] < 0.55  # still sharded
        assert zero2[rank]["probe"]["forwards"] == [12 * 2 * 2] * 2  # 2 micro-batches, twice
        assert zero2[rank]["probe"]["gathered_after_forward"] == [True, True]


def _cxx() -> str | None:
    return next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(_cxx() is None, reason="torch.compile on CPU needs a C++ compiler (inductor)")
def test_compile_with_zero2_and_recomputation(tmp_path: Path) -> None:
    """train.compile=true (each block compiled, checkpointed, then sharded) under zero2 trains
    like eager. Three steps: the compile itself is what costs (tens of seconds cold)."""
    base = [
        *EXACT,
        "train.max_steps=3",
        "data.val_fraction=0",  # no evaluation: one graph less to compile
        "parallel.strategy=zero2",
        FULL,
    ]
    eager, compiled = on_ranks(
        2,
        [
            ([*base, f"train.run_dir={tmp_path}/eager"], None),
            ([*base, "train.compile=true", f"train.run_dir={tmp_path}/compiled"], None),
        ],
        probe=compiled_blocks,  # no hooks: one added after compile would only compile again
    )
    for rank in range(2):
        assert eager[rank]["probe"] == [False, False]
        assert compiled[rank]["probe"] == [True, True]
        assert sorted(compiled[rank]["losses"]) == [1, 2, 3]
        assert all(math.isfinite(v) for v in compiled[rank]["losses"].values())
        assert compiled[rank]["params"].keys() == eager[rank]["params"].keys()
        for step, loss in eager[rank]["losses"].items():
            assert compiled[rank]["losses"][step] == pytest.approx(loss, rel=1e-4), step


GPT2_RUN = [
    *TINY_TEXT,
    "model._target_=transformers.GPT2LMHeadModel",
    "model.kwargs={n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, "
    "resid_pdrop: 0.0, embd_pdrop: 0.0, attn_pdrop: 0.0}",
    "train.max_steps=8",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "checkpoint.enabled=false",
]


@pytest.mark.slow
@pytest.mark.distributed
def test_a_transformers_model_under_zero2_with_recomputation(tmp_path: Path) -> None:
    """GPT2LMHeadModel by _target_: its _no_split_modules blocks (GPT2Block) are sharded and
    recomputed under zero2 on 2 ranks, and it trains as in one process without either."""
    pytest.importorskip("transformers", reason="the hf extra is not installed")
    torch.set_num_threads(1)
    single = train_in_process([*GPT2_RUN, f"train.run_dir={tmp_path}/single"], probe=watch)
    (zero2,) = on_ranks(
        2,
        [([*GPT2_RUN, "parallel.strategy=zero2", FULL, f"train.run_dir={tmp_path}/zero2"], None)],
    )
    assert single["losses"][8] < single["losses"][1]
    assert single["probe"]["forwards"] == [8, 8]  # two GPT2Blocks, one micro-batch per step
    for run in zero2:
        assert run["wrapper"] == "FSDPGPT2LMHeadModel"
        assert run["probe"]["forwards"] == [16, 16]
        assert run["probe"]["gathered_after_forward"] == [True, True]
        assert run["params"].keys() == single["params"].keys()
        assert 0.45 < run["local_numel"] / run["numel"] < 0.55
        # AdamW near zero gradients: see test_hf_models (sum order moves updates by ~1e-6)
        assert_same_training(single, run, atol=1e-5)
