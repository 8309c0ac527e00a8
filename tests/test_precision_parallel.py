"""Mixed precision (bf16/fp16 + loss scaling) and strategies (none/DDP/FSDP2, comm hooks)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_train.config.load import load_config
from dist_train.config.schema import ParallelConfig, PrecisionConfig
from dist_train.errors import ConfigError
from dist_train.launch.env import read_env
from dist_train.models.simple import MLP
from dist_train.parallel.wrap import resolve_strategy, wrap_model
from dist_train.train.build import build_trainer

from conftest import run_on_ranks
from helpers import EXACT_RUN, OPTIMIZERS, STEPS, TINY_GPT, assert_same_training, train_in_process

PRECISION_RUN = [
    *TINY_GPT,
    "train.max_steps=50",
    "train.global_batch_size=16",
    "log.every_steps=5",
    "optim.lr=3e-3",
    "train.eval_every=50",
]


def test_bf16_and_fp16_track_fp32(tmp_path: Path) -> None:
    """Stated tolerance: every logged loss within 2% of fp32's over 50 steps (measured: bf16
    ~0.1%, fp16 ~0.3% on this model), and the loss falls by at least 20%."""
    runs = {
        d: train_in_process(
            [*PRECISION_RUN, f"precision.dtype={d}", f"train.run_dir={tmp_path}/{d}"]
        )
        for d in ("fp32", "bf16", "fp16")
    }
    ref = runs["fp32"]["losses"]
    for dtype in ("bf16", "fp16"):
        losses = runs[dtype]["losses"]
        assert losses[50] < 0.8 * losses[5], dtype
        for step, value in ref.items():
            assert losses[step] == pytest.approx(value, rel=0.02), (dtype, step)
        assert runs[dtype]["val"][50] == pytest.approx(runs["fp32"]["val"][50], rel=0.02)
        # parameters stay fp32 whatever the compute dtype
        assert {t.dtype for t in runs[dtype]["params"].values()} == {torch.float32}
    fp16_log = [
        json.loads(line) for line in (tmp_path / "fp16/metrics.jsonl").read_text().splitlines()
    ]
    assert all("loss_scale" in r and "skipped_steps" in r for r in fp16_log if "loss" in r)


def test_fp16_overflow_skips_the_step_and_lowers_the_scale(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            *TINY_GPT,
            "precision.dtype=fp16",
            "train.max_steps=10",
            "log.every_steps=1",
            f"train.run_dir={tmp_path}",
            "optim.grad_clip=0",
        ],
    )
    env = read_env("cpu")
    trainer = build_trainer(cfg, env)
    weight = trainer.model.blocks[0].mlp[0].weight
    snapshots: dict[int, torch.Tensor] = {}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        snapshots[trainer.state.step] = weight.detach().clone()
        return grad * math.inf if trainer.state.step == 4 else grad  # the 5th step

    weight.register_hook(poison)
    result = trainer.fit()
    trainer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    assert [records[s]["skipped_steps"] for s in (4, 5, 6, 10)] == [0, 1, 1, 1]
    assert records[5]["loss_scale"] == records[4]["loss_scale"] / 2
    assert torch.equal(snapshots[4], snapshots[5])  # the skipped step did not touch weights
    assert not torch.equal(snapshots[5], snapshots[6])  # and training went on
    assert all(math.isfinite(v) for v in result.losses.values())


def test_none_adds_no_wrapper_and_strategy_errors() -> None:
    model = MLP(4, [8], 2)
    assert (
        wrap_model(model, ParallelConfig(strategy="none"), PrecisionConfig(), read_env("cpu", {}))
        is model
    )
    assert (
        wrap_model(model, ParallelConfig(strategy="auto"), PrecisionConfig(), read_env("cpu", {}))
        is model
    )
    with pytest.raises(ConfigError, match="world_size > 1"):
        resolve_strategy(ParallelConfig(strategy="fsdp"), 1)
    with pytest.raises(ConfigError, match="gradients must be synchronized"):
        resolve_strategy(ParallelConfig(strategy="none"), 2)
    with pytest.raises(ConfigError, match=r"precision\.reduce_dtype") as err:
        load_config(None, ["parallel.strategy=fsdp", "parallel.grad_compression=bf16"])
    assert err.value.key == "parallel.grad_compression"


@pytest.mark.distributed
@pytest.mark.parametrize("optim", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
def test_fsdp_matches_ddp_and_shards_parameters(optim: list[str], tmp_path: Path) -> None:
    """FSDP2 on 2 CPU ranks (gloo), with 2 accumulation micro-batches, equals DDP (fp32)."""
    base = [*EXACT_RUN, *optim, "train.micro_batch_size=2", "train.sample_tokens=8"]
    ddp = run_on_ranks(train_in_process, 2, [*base, f"train.run_dir={tmp_path}/ddp"])
    fsdp = run_on_ranks(
        train_in_process, 2, [*base, "parallel.strategy=fsdp", f"train.run_dir={tmp_path}/fsdp"]
    )
    assert ddp[0]["losses"][STEPS] < ddp[0]["losses"][1]
    for rank in range(2):
        assert (
            fsdp[rank]["wrapper"] == "FSDPGPT" and ddp[rank]["wrapper"] == "DistributedDataParallel"
        )
        assert_same_training(ddp[rank], fsdp[rank])
        # each rank stores about half of the parameters (dim-0 shards, padded to even sizes)
        assert 0.45 < fsdp[rank]["local_numel"] / fsdp[rank]["numel"] < 0.55
        assert ddp[rank]["local_numel"] == ddp[rank]["numel"]
        # the mesh was built for the run's device: a CPU run never moves to CUDA
        assert fsdp[rank]["meshes"] == {"cpu"} and fsdp[rank]["devices"] == {"cpu"}
    assert fsdp[0]["sample"] == fsdp[1]["sample"] == ddp[0]["sample"]


@pytest.mark.distributed
def test_ddp_compression_hooks_train(tmp_path: Path) -> None:
    base = [*EXACT_RUN, "optim.name=adamw", "optim.lr=3e-3", "parallel.powersgd_start_step=4"]
    runs = {
        name: run_on_ranks(
            train_in_process,
            2,
            [*base, f"parallel.grad_compression={name}", f"train.run_dir={tmp_path}/{name}"],
        )[0]
        for name in ("none", "bf16", "fp16", "powersgd")
    }
    for name, run in runs.items():
        assert run["losses"][STEPS] < 0.9 * run["losses"][1], name
    for name in ("bf16", "fp16"):  # compressed all-reduce tracks the exact one closely
        for step, value in runs["none"]["losses"].items():
            assert runs[name]["losses"][step] == pytest.approx(value, rel=1e-2), (name, step)


def test_unsupported_precision_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A build whose autocast cannot do the dtype warns and runs fp32; we refuse instead."""
    import warnings
    from contextlib import contextmanager

    from dist_train.parallel import precision

    @contextmanager
    def autocast_without_fp16(device_type: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
        warnings.warn(
            "In CPU autocast, but the target dtype is not supported. Disabling autocast.",
            stacklevel=2,
        )
        yield

    monkeypatch.setattr(precision.torch, "autocast", autocast_without_fp16)
    with pytest.raises(ConfigError, match="not supported on cpu") as err:
        precision.Precision(PrecisionConfig(dtype="fp16"), torch.device("cpu"))
    assert err.value.key == "precision.dtype"
    monkeypatch.undo()
    precision.Precision(PrecisionConfig(dtype="fp16"), torch.device("cpu"))  # this build: fine


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (nccl, CUDA autocast)")
def test_cuda_bf16_training(tmp_path: Path) -> None:
    cfg = [*PRECISION_RUN, "precision.dtype=bf16", "train.device=cuda", f"train.run_dir={tmp_path}"]
    run = train_in_process(cfg)
    assert run["losses"][50] < 0.8 * run["losses"][5]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("dtype", "strategy"),
    [
        ("bf16", ["parallel.strategy=fsdp"]),
        ("fp16", ["parallel.strategy=fsdp"]),
        ("bf16", ["parallel.strategy=zero2"]),
        # 2 replicas of 1 shard: the scaler's inf check and the gradients cross replicas
        ("fp16", ["parallel.strategy=hsdp", "parallel.shard_size=1"]),
    ],
)
def test_fsdp_mixed_precision_trains(dtype: str, strategy: list[str], tmp_path: Path) -> None:
    """FSDP2's MixedPrecisionPolicy (params gathered in `dtype`, grads reduced in bf16) plus
    autocast, under each FSDP2 strategy; fp16 adds the loss scaler on sharded gradients."""
    runs = run_on_ranks(
        train_in_process,
        2,
        [
            *PRECISION_RUN,
            *strategy,
            f"precision.dtype={dtype}",
            "precision.reduce_dtype=bf16",
            f"train.run_dir={tmp_path}",
        ],
    )
    assert runs[0]["losses"][50] < 0.8 * runs[0]["losses"][5]
    assert runs[0]["losses"] == runs[1]["losses"]  # one global loss, logged by every rank
    assert {t.dtype for t in runs[0]["params"].values()} == {torch.float32}
