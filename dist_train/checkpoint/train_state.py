"""The trainer's own checkpointed state, and the keys of the metric watches it carries
(`train/selection.py` updates them; the checkpointer saves them and names the best step)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

BEST, EARLY = "best", "early_stopping"  # keys of TrainState.watches


@dataclass
class TrainState:
    """The trainer's own checkpointed state; LR and data position are pure functions of step."""

    step: int = 0  # completed optimizer steps
    samples_seen: int = 0
    # Watched evaluation metrics (selection.py): best value, its step, evaluations since.
    watches: dict[str, dict[str, Any]] = field(default_factory=dict)
    stopped_early: bool = False
    # The evaluation due at `step` has not run (a stop signal came first): a resumed run runs it
    # before its first step, so that its records and decisions equal an uninterrupted run's.
    eval_owed: bool = False

    def for_manifest(self) -> dict[str, Any]:
        return {
            "watches": self.watches,
            "stopped_early": self.stopped_early,
            "eval_owed": self.eval_owed,
        }
