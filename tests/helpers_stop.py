"""Shared by the stop-signal tests: a run that records a stop signal at a chosen step (as its
handler would), a user metric that sends one at a chosen evaluation micro-batch, and the
records of metrics.jsonl that must not depend on a stop and resume."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import torch

from dist_train.track.summary import ACCOUNTING

from helpers import EARLY_STOPPING, SELECTION_RUN

# Selection as tests/test_selection.py runs it: val/count never improves after the first
# evaluation, so early stopping (patience 2) ends the run at step 6; the best val/loss moves.
RUN = [*SELECTION_RUN, *EARLY_STOPPING, "checkpoint.best.metric=val/loss"]


def train_signalled(
    run_dir: str,
    signal_at: int | None = None,
    rank: int = 0,
    extra: tuple[str, ...] = (),
    eval_batch: int | None = None,
) -> dict[str, Any]:
    """Train here (a rank under `run_on_ranks`); rank `rank` records SIGTERM during step
    `signal_at`, or after its evaluation micro-batch `eval_batch`. Returns how it ended, at
    which step, and the evaluation micro-batches it ran."""
    from dist_train.config.load import load_config
    from dist_train.launch.env import dist_session, read_env
    from dist_train.launch.signals import Preempted, StopRequest
    from dist_train.train.build import build_trainer

    cfg = load_config(None, [*RUN, *extra, f"train.run_dir={run_dir}"])
    env = read_env("cpu")
    request, batches = StopRequest(), [0]
    with dist_session(env, timeout_s=60):
        trainer = build_trainer(cfg, env, request)
        signalled = env.rank == rank
        if signal_at is not None and signalled:
            trainer.optimizer.register_step_post_hook(
                lambda *_: _record(request) if trainer.state.step == signal_at - 1 else None
            )
        loss = trainer.metrics[0]
        update = loss.update

        def counted(*args: Any) -> torch.Tensor:
            batches[0] += 1
            if signalled and batches[0] == eval_batch:
                _record(request)
            return update(*args)

        loss.update = counted  # type: ignore[method-assign]
        try:
            trainer.fit()
            return {"end": "done", "step": trainer.state.step, "eval_batches": batches[0]}
        except Preempted as stop:
            return {"end": "preempted", "step": stop.step, "eval_batches": batches[0]}
        finally:
            trainer.close()


def _record(request: Any) -> None:
    request.signum = signal.SIGTERM  # what the handler records (it also prints; not here)


def records(run_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[int, float]]]:
    """metrics.jsonl's evaluation records, and (step, loss) of its log records: the parts
    that do not depend on the clock."""
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [{k: v for k, v in r.items() if k not in ACCOUNTING} for r in lines if "val/loss" in r]
    return val, [(r["step"], r["loss"]) for r in lines if "loss" in r]


def trainer_state(run_dir: Path, step: int) -> dict[str, Any]:
    manifest = run_dir / "checkpoints" / f"step_{step:07d}" / "manifest.json"
    return json.loads(manifest.read_text())["trainer"]


class SignalAtBatch:
    """A user metric (`train.metrics`) that sends this process SIGTERM twice after micro-batch
    $STOP_SIGNAL_AT of the first evaluation, and writes how many it has seen to
    $STOP_COUNT_FILE: a deterministic moment inside an evaluation."""

    names = ("batches",)

    def __init__(self) -> None:
        self.seen = 0

    def update(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        if "STOP_COUNT_FILE" in os.environ:
            Path(os.environ["STOP_COUNT_FILE"]).write_text(str(self.seen))
        if self.seen == int(os.environ.get("STOP_SIGNAL_AT", "0")):
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)  # a repeat (scheduler and agent) says nothing
        return torch.ones(1, dtype=torch.float64)

    def compute(self, sums: torch.Tensor) -> dict[str, float]:
        return {"batches": sums.item()}
