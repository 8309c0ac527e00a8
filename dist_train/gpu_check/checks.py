"""The checks. Each fills `numbers` as it goes, raises CheckFailed / CheckSkipped, or returns
a one-line summary. With `--device cpu` the same code runs on tiny sizes (gloo for NCCL)."""

from __future__ import annotations

import math
import os
import re
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from dist_train.gpu_check.runner import Check, CheckFailed, CheckSkipped, Context, error_line

# The library is imported inside each check: an import error anywhere in it then fails the
# checks that need it, recorded in the JSON, instead of stopping the tool before it reports.
if TYPE_CHECKING:
    from dist_train.config import RunConfig
    from dist_train.gpu_check.training import TrainRun
    from dist_train.trainer import Trainer

PYTEST_TIMEOUT_S = 240
LOSS_FALL = 0.9  # "the loss falls": the last logged interval below 90% of the first
COUNT = re.compile(r"(\d+) (passed|failed|skipped|errors?|deselected|xfailed|xpassed)\b")


def pytest_counts(output: str) -> dict[str, int]:
    """Counts from pytest's final summary line ("1 passed, 2 skipped, 90 deselected in 3.1s")."""
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors", "deselected"), 0)
    finals = [line for line in output.splitlines() if COUNT.search(line) and " in " in line]
    for n, word in COUNT.findall(finals[-1] if finals else ""):
        counts["errors" if word.startswith("error") else word] = int(n)
    return counts


def pytest_gpu(ctx: Context, numbers: dict[str, Any]) -> str:
    if not (ctx.repo / "tests").is_dir():
        raise CheckSkipped(f"no tests/ folder next to the package in {ctx.repo}")
    torchrun = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")  # pytest's own, not ours
    env = {k: v for k, v in os.environ.items() if k not in torchrun}
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # and no .pytest_cache: leave the checkout as it was
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider"]
    try:
        proc = subprocess.run(
            cmd,
            cwd=ctx.repo,
            capture_output=True,
            text=True,
            env=env,
            timeout=PYTEST_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(f"pytest -m gpu did not finish in {PYTEST_TIMEOUT_S} s") from None
    counts = pytest_counts(proc.stdout)
    numbers.update(counts, exit_status=proc.returncode)
    if proc.returncode == 5:  # pytest: no test collected
        raise CheckSkipped("no test in tests/ is marked gpu")
    if proc.returncode or counts["failed"] or counts["errors"]:
        numbers["output_tail"] = "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
        first = next(
            (ln for ln in proc.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))),
            f"pytest exit status {proc.returncode}",
        )
        raise CheckFailed(f"{counts['failed']} failed, {counts['errors']} errors; {first}")
    if ctx.device.type == "cuda" and not counts["passed"]:
        raise CheckFailed(f"no gpu test ran on a GPU machine ({counts['skipped']} skipped)")
    return f"{counts['passed']} passed, {counts['skipped']} skipped"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl_init(ctx: Context, numbers: dict[str, Any]) -> str:
    cuda = ctx.device.type == "cuda"
    backend, port = ("nccl" if cuda else "gloo"), free_port()
    numbers.update(backend=backend, port=port)
    if cuda:
        torch.cuda.set_device(ctx.device)
    start = time.perf_counter()
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=60),
        **({"device_id": ctx.device} if cuda else {}),
    )
    try:
        numbers["init_s"] = round(time.perf_counter() - start, 3)
        x = torch.arange(1 << 20, dtype=torch.float32, device=ctx.device)
        dist.all_reduce(x)  # a sum over the one rank: the values must come back unchanged
        if cuda:
            torch.cuda.synchronize(ctx.device)
        numbers["all_reduce_s"] = round(time.perf_counter() - start - numbers["init_s"], 3)
        numbers["all_reduce_ok"] = torch.equal(x.cpu(), torch.arange(1 << 20, dtype=torch.float32))
    finally:
        dist.destroy_process_group()
    if not numbers["all_reduce_ok"]:
        raise CheckFailed(f"{backend} all_reduce of 2^20 floats over one rank changed the values")
    return f"{backend}: init {numbers['init_s']:.2f} s, all_reduce of 4 MiB correct"


def quickstart(ctx: Context, name: str, steps: int, *extra: str) -> RunConfig:
    """configs/quickstart.yaml on the check's device, in its own run dir, quiet."""
    from dist_train.config import load_config

    # shipped inside the package by a wheel install, at the top of a checkout otherwise
    found = [
        p
        for p in (ctx.repo / "dist_train" / "configs", ctx.repo / "configs")
        if (p / "quickstart.yaml").is_file()
    ]
    if not found:
        raise CheckSkipped(f"configs/quickstart.yaml not found in the package or in {ctx.repo}")
    path = found[0] / "quickstart.yaml"
    return load_config(
        path,
        [
            f"train.device={ctx.device.type}",
            f"train.run_dir={ctx.work_dir / name}",
            f"train.max_steps={steps}",
            f"optim.warmup_steps={max(1, steps // 4)}",
            f"log.every_steps={max(1, steps // 10)}",
            "log.progress=never",
            "train.sample_chars=0",
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


def stop_and_resume(ctx: Context, k: int, tag: str) -> tuple[TrainRun, TrainRun, list[str]]:
    """An uninterrupted 2K-step run, and one stopped after K then resumed to 2K; async saves
    every K/2 in both. Returns (uninterrupted, resumed, the cut run's checkpoints)."""
    from dist_train.checkpoint.files import complete_checkpoints
    from dist_train.gpu_check.training import train

    full, cut = (
        quickstart(
            ctx,
            f"resume_{tag}_{name}",
            2 * k,
            "checkpoint.async=true",
            f"checkpoint.every_steps={max(1, k // 2)}",
            "log.every_steps=1",
        )
        for name in ("full", "cut")
    )
    uninterrupted = train(full)
    train(cut, stop_at=k)
    saved = [p.name for p in complete_checkpoints(Path(cut.train.run_dir) / "checkpoints")]
    return uninterrupted, train(cut), saved


def async_checkpoint_resume(ctx: Context, numbers: dict[str, Any]) -> str:
    from dist_train.gpu_check.training import deterministic, max_rel_diff, weights_diff

    k = ctx.sizes.resume_every
    for strict in (True, False):  # strict first; a kernel it refuses: record it, go on without
        try:
            with deterministic(strict) as caught:
                full, resumed, saved = stop_and_resume(ctx, k, "strict" if strict else "warn")
            break
        except RuntimeError as e:
            if not strict or "determinis" not in str(e):
                raise
            numbers["strict_determinism_error"] = error_line(e)
    numbers.update(
        k=k, strict_determinism=strict, cut_run_checkpoints=saved, **(full.staging or {})
    )
    numbers["nondeterminism_warnings"] = sorted(
        {str(w.message).splitlines()[0][:200] for w in caught if "determinis" in str(w.message)}
    )
    later = range(k + 1, 2 * k + 1)
    if sorted(resumed.losses) != list(later):
        raise CheckFailed(
            f"the resumed run logged steps {sorted(resumed.losses)[:3]}..., "
            f"expected {k + 1}..{2 * k}: it did not resume from step {k}"
        )
    check_pinned(ctx, full.staging)
    a, b = [full.losses[s] for s in later], [resumed.losses[s] for s in later]
    weights_bitwise, weights_rel = weights_diff(full.model, resumed.model)
    numbers.update(
        losses_bitwise=a == b,
        loss_max_rel_diff=max_rel_diff(a, b),
        weights_bitwise=weights_bitwise,
        weights_max_rel_diff=weights_rel,
    )
    if a != b or not weights_bitwise:
        raise CheckFailed(
            f"stop at {k} + resume differs from the uninterrupted run: max relative difference "
            f"{numbers['loss_max_rel_diff']:.2e} (losses), {weights_rel:.2e} (weights); "
            f"strict determinism {'on' if strict else 'refused'}; nondeterministic ops: "
            f"{numbers['nondeterminism_warnings'] or 'none reported'}"
        )
    return (
        f"resume at {k} of {2 * k}: losses and weights bitwise equal; {pinned_text(full.staging)}"
    )


def check_pinned(ctx: Context, staging: dict[str, Any] | None) -> None:
    """On CUDA the async staging copy must be page-locked. DCP pins it with cudaHostRegister,
    which raises when it fails, so "pinning requested" and a save that worked mean pinned;
    is_pinned() is recorded as a second opinion (it asks cudaPointerGetAttributes)."""
    if ctx.device.type != "cuda" or staging is None:
        return  # CPU runs stage into plain memory; None: DCP's internals moved, not observable
    if not staging["pin_requested"] or not staging["pinnable_storages"]:
        raise CheckFailed(f"async staging memory is not page-locked: {pinned_text(staging)}")


def pinned_text(staging: dict[str, Any] | None) -> str:
    if staging is None:
        return "staging memory not observable"
    return (
        f"staging {staging['staged_bytes'] / 2**20:.1f} MiB, pinning "
        f"{'on' if staging['pin_requested'] else 'off'}, {staging['pinned_storages']}/"
        f"{staging['pinnable_storages']} storages report is_pinned()"
    )


def export_check(ctx: Context, numbers: dict[str, Any]) -> str:
    from safetensors.torch import load_file

    from dist_train.checkpoint.export import export
    from dist_train.gpu_check.training import train, weights_diff
    from dist_train.models import build_model

    cfg = quickstart(ctx, "export_run", ctx.sizes.export_steps)
    run = train(cfg)
    out = export(cfg.train.run_dir, str(ctx.work_dir / "model.safetensors"))
    fresh = build_model(cfg.model, run.spec)
    fresh.load_state_dict(load_file(out))  # strict: every name and shape must match
    fresh.to(ctx.device).eval()
    run.model.eval()
    weights_bitwise, _ = weights_diff(run.model, fresh)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(run.spec.vocab_size, (4, cfg.model.block_size), generator=g).to(ctx.device)
    with torch.no_grad():
        a, b = run.model(x), fresh(x)
    numbers.update(
        file_bytes=out.stat().st_size,
        tensors=len(load_file(out)),
        weights_bitwise=weights_bitwise,
        outputs_bitwise=torch.equal(a, b),
        outputs_max_abs_diff=(a - b).abs().max().item(),
    )
    if not weights_bitwise:
        raise CheckFailed("the exported weights differ from the trained model's")
    # Same weights and input: only a different kernel choice (memory alignment) may differ.
    if not torch.allclose(a, b, rtol=1e-5, atol=1e-5):
        raise CheckFailed(f"outputs differ: max abs diff {numbers['outputs_max_abs_diff']:.3g}")
    return (
        f"{numbers['tensors']} tensors, {numbers['file_bytes'] / 1e6:.1f} MB; weights bitwise, "
        f"outputs {'bitwise' if numbers['outputs_bitwise'] else 'allclose'}"
    )


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


def throughput_gpt2_small(ctx: Context, numbers: dict[str, Any]) -> str:
    from dist_train.gpu_check.training import open_trainer
    from dist_train.metrics import mfu, peak_flops
    from dist_train.models import count_parameters
    from dist_train.parallel import unwrap

    s = ctx.sizes
    cfg = quickstart(
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


CHECKS = (
    Check("pytest_gpu", "the repository's tests marked gpu (pytest -m gpu)", pytest_gpu),
    Check(
        "nccl_init",
        "one-rank NCCL process group (gloo with --device cpu): init, all_reduce",
        nccl_init,
    ),
    Check("train_bf16", "quickstart GPT in bf16: the loss falls", train_bf16),
    Check("train_fp16", "quickstart GPT in fp16 with the loss scaler: the loss falls", train_fp16),
    Check(
        "compile", "quickstart GPT with train.compile=true (bf16): the loss falls", compile_check
    ),
    Check(
        "async_checkpoint_resume",
        "async saves (pinned staging); stop at K + resume == uninterrupted 2K steps, bitwise",
        async_checkpoint_resume,
    ),
    Check(
        "export",
        "export to .safetensors, load into a fresh model: same weights and outputs",
        export_check,
    ),
    Check(
        "throughput_gpt2_small",
        "GPT-2 small (12x768, context 1024), bf16, compiled: tokens/s and MFU",
        throughput_gpt2_small,
    ),
)
