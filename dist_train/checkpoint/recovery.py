"""Start-up recovery of the checkpoint folders, by the run directory's owner before anything
reads them: a commit that a crash cut short is finished when its folder verifies, else rolled
back, and the rest of an interrupted save or deletion is removed (launch.rundir.remove_debris).
Afterwards every checkpoint is a complete `step_N` folder again, and only those."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from dist_train.checkpoint.checksums import damaged_files
from dist_train.checkpoint.commit import put_in_place
from dist_train.checkpoint.files import MANIFEST, TMP, step_of
from dist_train.errors import ConfigError
from dist_train.launch.rundir import remove_debris


def verified(folder: Path) -> bool:
    """A written folder whose commit got as far as its manifest (written and fsynced before
    any rename) and whose every file has the size and checksum the manifest records."""
    final = folder.with_name(folder.name[len(TMP) :])
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        return (
            manifest["step"] == step_of(final)
            and ".metadata" in manifest["files"]
            and not damaged_files(manifest, folder)
        )
    except (OSError, ValueError, KeyError, TypeError):  # no manifest, or half of one
        return False


def recover_checkpoints(run_dir: Path, say: Callable[[str], None]) -> None:
    """Finish each interrupted commit whose `.tmp_step_N` verifies (renaming the old `step_N`
    aside and back as a commit does), then roll back or remove what is left. One line says
    what was done, when anything was."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return
    done: list[str] = []
    try:
        for tmp in sorted(root.glob(f"{TMP}step_*")):
            if verified(tmp):
                final = tmp.with_name(tmp.name[len(TMP) :])
                put_in_place(tmp, final)
                done.append(
                    f"finished the interrupted commit of {final.name} (its manifest and "
                    "checksums verified)"
                )
        remove_debris(run_dir, done.append)
    except OSError as e:  # a read-only or vanished mount: one line, not a traceback
        raise ConfigError(
            "train.run_dir", str(run_dir), f"cannot recover its checkpoints ({e.strerror or e})"
        ) from None
    if done:
        say(f"checkpoints: {'; '.join(done)}")
