"""TensorBoard: scalars and the hyperparameters in RUN_DIR/tensorboard, through torch's writer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dist_train.track.backend import run_summary, scalars, summary_markdown


class TensorBoardTracker:
    run_id = None  # a resumed run writes to the same directory: nothing to remember

    def __init__(self, log_dir: Path, hparams: dict[str, Any], purge_step: int | None) -> None:
        """`purge_step`: TensorBoard hides this directory's events from that step on, written
        by an earlier attempt (a resume rolled them back)."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
        # Only the session-start summary, in this run's own directory: the HPARAMS tab then
        # lists the run with its hyperparameters and takes every scalar tag as a metric.
        # (SummaryWriter.add_hparams would open a second run in a subdirectory and want a
        # fixed metric dict.)
        _, session_start, _ = hparams_summaries(hparams, {})
        self.writer.file_writer.add_summary(session_start)

    def log(self, record: dict[str, Any]) -> None:
        step = record["step"]
        if (facts := run_summary(record)) is not None:  # the TEXT tab, at the start step
            self.writer.add_text("run_start", summary_markdown(facts), step)
            return
        for key, value in scalars(record).items():
            self.writer.add_scalar(key, value, step)

    def close(self, finished: bool) -> None:
        self.writer.close()
