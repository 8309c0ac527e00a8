"""The training checks: the quickstart GPT trains in bf16, fp16 and compiled, and the GPT-2
small throughput; quickstart() is the config every check that trains starts from. Each fills
`numbers` as it goes, raises CheckFailed / CheckSkipped, or returns a one-line summary. With
`--device cpu` the same code runs on tiny sizes."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_train.gpu_check.runner import CheckFailed, CheckSkipped, Context

# The library is imported inside each check: an import error anywhere in it then fails the
# checks that need it, recorded in the JSON, instead of stopping the tool before it reports.
if TYPE_CHECKING:
    from dist_train.config.schema import RunConfig
    from dist_train.gpu_check.training import TrainRun
    from dist_train.train.trainer import Trainer

LOSS_FALL = 0.9  # "the loss falls": the last logged interval below 90% of the first


def quickstart_path(ctx: Context) -> Path:
    """configs/quickstart.yaml: shipped inside the package by a wheel install, at the top of a
    checkout otherwise."""
    found = [
        p
        for p in (ctx.repo / "dist_train" / "configs", ctx.repo / "configs")
        if (p / "quickstart.yaml").is_file()
    ]
    if not found:
        raise CheckSkipped(f"configs/quickstart.yaml not found in the package or in {ctx.repo}")
    return found[0] / "quickstart.yaml"


def quickstart(ctx: Context, name: str, steps: int, *extra: str) -> RunConfig:
    """configs/quickstart.yaml on the check's device, in its own run dir, quiet."""
    from dist_train.config.load import load_config

    return load_config(
        quickstart_path(ctx),
        [
            f"train.device={ctx.device.type}",
            f"train.run_dir={ctx.work_dir / name}",
            f"train.max_steps={steps}",
            f"optim.warmup_steps={max(1, steps // 4)}",
            f"log.every_steps={max(1, steps // 10)}",
            "log.progress=never",
            "train.sample_tokens=0",
            "train.eval_every=0",
            *ctx.sizes.model,
            *extra,
        ],
    )


def loss_falls(run: TrainRun, cfg: RunConfig, numbers: dict[str, Any]) -> str:
    logged = [r for r in run.records if "loss" in r]
    if not logged:
        raise CheckFailed("no loss was logged")
    first, last = logged[0], logged[-1]
    numbers.update(
        steps=last["step"],
        first_loss=first["loss"],
        last_loss=last["loss"],
        steps_per_sec=last["samples_per_sec"] / cfg.train.global_batch_size,
        tokens_per_sec=last.get("tokens_per_sec"),
        mfu=last.get("mfu"),
        wall_s=round(run.wall_s, 3),
        **{k: last[k] for k in ("loss_scale", "skipped_steps") if k in last},
    )
    summary = (
        f"loss {first['loss']:.3f} -> {last['loss']:.3f} in {last['step']} steps, "
        f"{numbers['steps_per_sec']:.1f} steps/s"
    )
    if not all(math.isfinite(r["loss"]) for r in logged):
        raise CheckFailed(f"a logged loss is not finite: {[r['loss'] for r in logged]}")
    if not last["loss"] < LOSS_FALL * first["loss"]:
        raise CheckFailed(f"loss did not fall below {LOSS_FALL:.0%} of its start: {summary}")
    return summary


def train_check(ctx: Context, numbers: dict[str, Any], name: str, steps: int, *extra: str) -> str:
    from dist_train.gpu_check.training import train

    cfg = quickstart(ctx, name, steps, *extra)
    return loss_falls(train(cfg), cfg, numbers)


def train_bf16(ctx: Context, numbers: dict[str, Any]) -> str:
    return train_check(ctx, numbers, "train_bf16", ctx.sizes.train_steps, "precision.dtype=bf16")


def train_fp16(ctx: Context, numbers: dict[str, Any]) -> str:
    summary = train_check(ctx, numbers, "train_fp16", ctx.sizes.train_steps, "precision.dtype=fp16")
    return (
        f"{summary}, loss scale {numbers.get('loss_scale')}, {numbers.get('skipped_steps')} skipped"
    )


def dynamo_totals() -> tuple[int, int]:
    """(graphs compiled, graph breaks) so far in this process: dynamo's counters are global."""
    from torch._dynamo.utils import counters  # the first import of dynamo costs seconds

    return counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())


def record_dynamo(numbers: dict[str, Any], before: tuple[int, int]) -> None:
    after = dynamo_totals()
    numbers.update(dynamo_graphs=after[0] - before[0], graph_breaks=after[1] - before[1])


def compile_check(ctx: Context, numbers: dict[str, Any]) -> str:
    before = dynamo_totals()
    try:
        summary = train_check(
            ctx,
            numbers,
            "compile",
            ctx.sizes.compile_steps,
            "precision.dtype=bf16",
            "train.compile=true",
        )
    finally:  # kept on failure too: graph breaks are the likeliest explanation
        record_dynamo(numbers, before)
    return f"{summary}, {numbers['dynamo_graphs']} graphs, {numbers['graph_breaks']} breaks"


def time_steps(
    trainer: Trainer, warmup: int, timed: int, numbers: dict[str, Any]
) -> tuple[float, float]:
    """Warm-up steps (the first compiles), then `timed` steps between two synchronizations:
    (seconds, mean loss of the timed steps)."""
    from dist_train.gpu_check.training import sync

    device, start = trainer.env.device, time.perf_counter()
    for step in range(warmup):
        trainer.train_step(step, measure_norm=False)
        sync(device)
        numbers.setdefault("first_step_s", round(time.perf_counter() - start, 3))
    trainer._interval_loss.zero_()  # the loop's device-side loss sum: the timed steps only
    start = time.perf_counter()
    for step in range(warmup, warmup + timed):
        trainer.train_step(step, measure_norm=False)
    sync(device)
    return time.perf_counter() - start, trainer._interval_loss.item() / timed


def _throughput_config(ctx: Context) -> RunConfig:
    """The quickstart at the big model's size in bf16, without checkpoints or evaluation: only
    the timed steps' work is in the figures."""
    s = ctx.sizes
    return quickstart(
        ctx,
        "throughput",
        s.warmup_steps + s.timed_steps,
        "precision.dtype=bf16",
        f"train.compile={str(s.compile_big).lower()}",
        "checkpoint.enabled=false",
        "train.eval_batches=0",
        "model.dropout=0.0",
        *s.big_model,
    )


def throughput_gpt2_small(ctx: Context, numbers: dict[str, Any]) -> str:
    from dist_train.gpu_check.training import open_trainer
    from dist_train.models.registry import count_parameters
    from dist_train.parallel.wrap import unwrap
    from dist_train.track.metrics import mfu, peak_flops

    s = ctx.sizes
    cfg = _throughput_config(ctx)
    before = dynamo_totals()
    with open_trainer(cfg) as trainer:
        model, device = unwrap(trainer.model), trainer.env.device
        numbers.update(
            parameters=count_parameters(model),
            vocab_size=trainer.data.spec.vocab_size,
            **{k: v for k, v in vars(cfg.model).items() if k.startswith(("n_", "block"))},
            batch_size=cfg.train.global_batch_size,
            compile=cfg.train.compile,
            warmup_steps=s.warmup_steps,
            timed_steps=s.timed_steps,
        )
        elapsed, loss = time_steps(trainer, s.warmup_steps, s.timed_steps, numbers)
        peak, flops = peak_flops(cfg.log, device, "bf16"), model.flops_per_token()
    record_dynamo(numbers, before)  # one graph per mode for all blocks; more: recompilations
    tokens_per_sec = s.timed_steps * cfg.train.global_batch_size * cfg.model.block_size / elapsed
    numbers.update(
        step_ms=1e3 * elapsed / s.timed_steps,
        tokens_per_sec=tokens_per_sec,
        timed_loss=loss,
        flops_per_token=flops,
        achieved_tflops=tokens_per_sec * flops / 1e12,
        peak_tflops=peak / 1e12 if peak else None,
        mfu=mfu(tokens_per_sec, flops, peak, 1) if peak else None,
        peak_memory_bytes=(
            torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        ),
    )
    if not math.isfinite(loss):
        raise CheckFailed(f"the timed steps' mean loss is {loss}")
    rate = f"{tokens_per_sec:,.0f} tokens/s, {numbers['achieved_tflops']:.1f} TFLOP/s"
    if not peak:
        return f"{rate}; MFU n/a (no known peak for this device)"
    return f"{rate} of {peak / 1e12:.0f} peak (bf16): MFU {numbers['mfu']:.1%}"
