"""Rank 0's commit of a written step folder (manifest, fsync, renames, retention), and the
one-line error of a save that could not be written.

Every change to a visible `step_N` folder is a rename, so `step_N` is always complete:
- a commit renames an existing `step_N` aside to `.old_step_N`, the new `.tmp_step_N` into
  place, and only then deletes the aside copy;
- retention renames an old checkpoint to `.del_step_N` in one rename, then deletes it.
A crash at any point leaves the old or the new checkpoint complete under a name that
`recovery.recover_checkpoints` finishes or rolls back at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_train.checkpoint.files import (
    ASIDE,
    DELETING,
    MANIFEST,
    complete_checkpoints,
    fsync_dir,
    manifest_for,
    point_best,
    step_name,
    step_of,
)
from dist_train.checkpoint.integrity import collect_digests
from dist_train.checkpoint.lineage import checkpoint_id
from dist_train.checkpoint.train_state import BEST, TrainState
from dist_train.config.schema import RunConfig
from dist_train.errors import DistTrainError, first_line
from dist_train.launch.env import DistEnv
from dist_train.launch.faults import Fault


def commit_step(
    cfg: RunConfig,
    env: DistEnv,
    root: Path,
    saved: TrainState,
    tmp: Path,
    tied: list[list[str]],
    parent: dict[str, Any] | None = None,
    fault: Fault | None = None,
) -> dict[str, Any]:
    """Write the manifest into `tmp`, fsync it, put `tmp` in place as `step_N` under `root`,
    then apply retention. Rank 0 only: DCP returns there only once every rank's shards are
    written. `parent`: the checkpoint this one continues ({"step", "id"}: the one the run
    resumed from, or its previous save; None for a run's first). Returns this one's reference,
    the parent of the run's next save. `fault`: a test's, struck at "commit" (the manifest
    written, the folder not yet in place) and "retention" (an older one half deleted)."""
    digests = collect_digests(tmp)
    manifest = manifest_for(cfg, env, saved.step, saved.samples_seen, tmp, digests, tied)
    manifest["trainer"] = saved.for_manifest()
    manifest["parent"] = parent
    manifest["id"] = checkpoint_id(manifest)
    path = tmp / MANIFEST
    path.write_text(json.dumps(manifest, indent=1))
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    if fault is not None:
        fault.reached("commit", saved.step)
    put_in_place(tmp, root / step_name(saved.step))
    retention = None if fault is None else lambda: fault.reached("retention", saved.step)
    _retain(root, saved, cfg.checkpoint.keep_last, retention)
    return {"step": saved.step, "id": manifest["id"]}


def put_in_place(new: Path, final: Path) -> None:
    """Make the complete folder `new` visible as `final`. An existing `final` (a step saved
    again, e.g. after resuming from an older checkpoint) is renamed aside first and deleted
    only once `new` is in place (durably): at any instant one complete copy holds the name
    `final` or `.old_<final>`, never neither."""
    aside = final.with_name(ASIDE + final.name)
    if final.exists():
        if aside.exists():  # left by an earlier crash while `final` was already complete
            shutil.rmtree(aside)
        os.replace(final, aside)
    try:
        os.replace(new, final)
    except OSError:  # the rename itself failed (the run goes on living): put the old one back
        if aside.exists() and not final.exists():
            os.replace(aside, final)
        raise
    fsync_dir(final.parent)
    if aside.exists():  # a crash in here leaves a partial aside copy beside a complete `final`
        shutil.rmtree(aside, ignore_errors=True)


def discard(folder: Path, hidden_now: Callable[[], None] | None = None) -> None:
    """Delete a checkpoint so it is never seen half-deleted: one rename to a hidden name (the
    folder stops counting at once), then the files. A crash leaves only a `.del_*` folder.
    `hidden_now`: called between the two (where a test's fault strikes)."""
    hidden = folder.with_name(DELETING + folder.name)
    if hidden.exists():
        shutil.rmtree(hidden, ignore_errors=True)
    os.replace(folder, hidden)
    if hidden_now is not None:
        hidden_now()
    shutil.rmtree(hidden, ignore_errors=True)


def _retain(
    root: Path, saved: TrainState, keep_last: int, deleting: Callable[[], None] | None = None
) -> None:
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
        # As before, a folder that cannot go now (a busy NFS file) goes at a later save.
        with contextlib.suppress(OSError):
            discard(old, deleting)
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
