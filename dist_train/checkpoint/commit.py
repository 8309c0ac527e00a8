"""Rank 0's commit of a written step folder (manifest, fsync, one atomic rename, retention),
and the one-line error of a save that could not be written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from dist_train.checkpoint.files import (
    MANIFEST,
    complete_checkpoints,
    fsync_dir,
    manifest_for,
    point_best,
    step_of,
)
from dist_train.checkpoint.integrity import collect_digests
from dist_train.checkpoint.train_state import BEST, TrainState
from dist_train.config.schema import RunConfig
from dist_train.errors import DistTrainError, first_line
from dist_train.launch.env import DistEnv


def commit_step(
    cfg: RunConfig, env: DistEnv, root: Path, saved: TrainState, tmp: Path, tied: list[list[str]]
) -> None:
    """Write the manifest into `tmp`, fsync it, rename `tmp` to `step_N` under `root`, then
    apply retention. Rank 0 only: DCP returns there only once every rank's shards are written."""
    digests = collect_digests(tmp)
    manifest = manifest_for(cfg, env, saved.step, saved.samples_seen, tmp, digests, tied)
    manifest["trainer"] = saved.for_manifest()
    path = tmp / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    final = root / f"step_{saved.step:07d}"
    if final.exists():  # re-saving a step (e.g. resume=none in a used run dir)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    _retain(root, saved, cfg.checkpoint.keep_last)


def _retain(root: Path, saved: TrainState, keep_last: int) -> None:
    """Drop the oldest step folders beyond `keep_last`, counting the one just committed."""
    # Retention looks only below the step just committed: a folder with a higher number is
    # not this lineage's past (with one owner per run directory there is none) and a
    # newer-looking leftover must never push out the checkpoint that was just written.
    # The best checkpoint (checkpoint.best) is kept apart: never counted, never removed.
    best = saved.watches.get(BEST, {}).get("step")
    older = [
        p for p in complete_checkpoints(root) if step_of(p) < saved.step and step_of(p) != best
    ]
    for old in older[: max(0, len(older) - (keep_last - 1))]:
        shutil.rmtree(old, ignore_errors=True)
    if best is not None:
        point_best(root, best)


def save_failure(root: Path, tmp: Path, error: BaseException, is_main: bool) -> DistTrainError:
    """A save that could not be written (a full disk, a vanished mount): the partial folder
    goes (rank 0 removes it), the previous checkpoint stays, and the reason is one line."""
    found = complete_checkpoints(root)
    reason = first_line(error)
    # A full disk often surfaces as a short write inside torch.save's zip writer ("unexpected
    # pos ..."): say what it is, measured before the partial save frees its space.
    free = shutil.disk_usage(root).free
    need = sum(p.stat().st_size for p in found[-1].rglob("*") if p.is_file()) if found else 0
    if "No space left" in reason or free < max(need, 1 << 20):
        reason = (
            f"No space left on device ({free / 1e6:.1f} MB free on that filesystem; a "
            f"checkpoint takes about {need / 1e6:.1f} MB)"
        )
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    kept = f"{found[-1]} is intact" if found else "there is no earlier checkpoint"
    failure = DistTrainError(
        f"checkpoint: cannot write {tmp}: {reason}; the partial save was removed and {kept}"
    )
    failure.on_every_rank = True  # type: ignore[attr-defined]  # the same on all ranks
    return failure
