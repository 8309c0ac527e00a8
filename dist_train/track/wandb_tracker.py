"""Weights & Biases: offline by default, its files in RUN_DIR/wandb (`wandb sync` uploads them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.track.backend import run_summary, scalars


class WandbTracker:
    def __init__(
        self,
        run_dir: Path,
        hparams: dict[str, Any],
        project: str,
        entity: str,
        mode: str,
        run_id: str | None,
        name: str,
    ) -> None:
        """`run_id`: the run an earlier attempt of this run directory started, to continue."""
        import wandb

        self.run = wandb.init(
            project=project,
            entity=entity or None,
            mode=mode,
            dir=str(run_dir),
            name=name,
            id=run_id,
            resume="allow" if run_id else None,
            # silent: no banner or sync hints on our console; console="off": W&B leaves
            # stdout alone (it would otherwise wrap it to capture the output).
            settings=wandb.Settings(silent=True, console="off"),
        )
        # After init, not through it: a resumed run may change values (e.g. train.max_steps).
        self.run.config.update(hparams, allow_val_change=True)
        self.run_id: str | None = self.run.id

    def log(self, record: dict[str, Any]) -> None:
        if (facts := run_summary(record)) is not None:  # the run's summary, not a history row
            self.run.summary.update({"run_start": facts})
            return
        # Records of the same step (training, then evaluation) merge into one W&B row.
        self.run.log(scalars(record), step=record["step"])

    def close(self, finished: bool) -> None:
        self.run.finish(exit_code=0 if finished else 1)
