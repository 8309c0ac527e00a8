"""The checkpoint checks: async saves, stop and resume against an uninterrupted run, and the
.safetensors export. Each fills `numbers` as it goes, raises CheckFailed / CheckSkipped, or
returns a one-line summary. With `--device cpu` the same code runs on tiny sizes."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_train.gpu_check.runner import CheckFailed, Context, error_line
from dist_train.gpu_check.train_checks import quickstart

# The library is imported inside each check: an import error anywhere in it then fails the
# checks that need it, recorded in the JSON, instead of stopping the tool before it reports.
if TYPE_CHECKING:
    from dist_train.gpu_check.training import TrainRun


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
    from safetensors.torch import load_file, load_model

    from dist_train.checkpoint.export import export
    from dist_train.gpu_check.training import train, weights_diff
    from dist_train.models.registry import build_model

    cfg = quickstart(ctx, "export_run", ctx.sizes.export_steps)
    run = train(cfg)
    out = export(cfg.train.run_dir, str(ctx.work_dir / "model.safetensors"), "fp32", print)
    fresh = build_model(cfg.model, run.spec)
    load_model(fresh, out)  # strict: every name and shape must match, tied weights stored once
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
