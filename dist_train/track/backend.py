"""What every destination of metrics records offers (`Backend`, `Tracker`), the scalars a
tracker plots and the run summary it shows. Each tracker module imports this, never the module
that builds them."""

from __future__ import annotations

import math
from typing import Any, Protocol

from dist_train.track.summary import ACCOUNTING, RUN_START, summary_lines, tracker_key


class Backend(Protocol):
    """One destination of metrics records (metrics.jsonl, the console, a tracker)."""

    def log(self, record: dict[str, Any]) -> None:
        """One metrics record: `step` and any other keys (not a fixed list)."""

    def close(self, finished: bool) -> None:
        """`finished`: the run reached train.max_steps (else it stopped or failed)."""


class Tracker(Backend, Protocol):
    """An experiment tracker, on rank 0 only; the hyperparameters go in at construction."""

    run_id: str | None  # kept in RUN_DIR/trackers.json for a resume to continue (None: nothing)


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's finite numbers, without `step`, under the trackers' names (`train/loss`
    beside `val/loss`): what trackers plot. None and NaN/inf are left out here (metrics.jsonl
    writes them as null and names them in `nonfinite`), and so are goodput's inputs."""
    return {
        tracker_key(key): float(value)
        for key, value in record.items()
        if key != "step"
        and key not in ACCOUNTING
        and isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def run_summary(record: dict[str, Any]) -> dict[str, Any] | None:
    """The facts of a `run_start` record (None values left out), None for any other record."""
    facts = record.get(RUN_START)
    return None if facts is None else {k: v for k, v in facts.items() if v is not None}


def summary_markdown(facts: dict[str, Any]) -> str:
    """The console's summary block as Markdown preformatted text (TensorBoard, MLflow notes)."""
    return "\n".join("    " + line for line in summary_lines(facts))
