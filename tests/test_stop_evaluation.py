"""A stop signal and evaluation: a stop at an evaluation step owes that evaluation and the resumed
run runs it first (records and decisions as an uninterrupted run's), a stop during a long
evaluation cuts it short at a micro-batch every rank agrees on, and the first signal says at once
that it was received."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli, run_on_ranks
from helpers_stop import records, train_signalled, trainer_state


@pytest.mark.parametrize("signal_at", [4, 6])
def test_a_stop_at_an_evaluation_step_is_evaluated_by_the_resumed_run(
    tmp_path: Path, signal_at: int
) -> None:
    """Step 4: the resumed run evaluates 4 first, then trains on; step 6: that evaluation is
    the one that stops the run early. Either way the records, the best checkpoint and the
    early stop equal those of a run that was never stopped."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    # Each evaluation: 10 samples in global batches of 6, 2 micro-batches.
    assert train_signalled(str(ref)) == {"end": "done", "step": 6, "eval_batches": 6}
    stopped = train_signalled(str(cut), signal_at=signal_at)
    evaluated = 2 * (signal_at // 2 - 1)  # not the one at signal_at
    assert stopped == {"end": "preempted", "step": signal_at, "eval_batches": evaluated}
    assert trainer_state(cut, signal_at)["eval_owed"] is True
    assert train_signalled(str(cut))["end"] == "done"
    assert records(cut) == records(ref)  # val at 2, 4, 6; the same losses step by step
    assert (cut / "checkpoints" / "best").readlink() == (ref / "checkpoints" / "best").readlink()
    assert trainer_state(cut, 6) == trainer_state(ref, 6)  # stopped early, nothing owed


@pytest.mark.distributed
def test_the_same_with_2_workers_signalled_on_rank_1(tmp_path: Path) -> None:
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    run_on_ranks(train_signalled, 2, str(ref))
    stopped = run_on_ranks(train_signalled, 2, str(cut), 4, 1)
    assert [s["end"] for s in stopped] == ["preempted"] * 2
    assert [s["step"] for s in stopped] == [4, 4]
    run_on_ranks(train_signalled, 2, str(cut))
    assert records(cut) == records(ref)
    assert trainer_state(cut, 6) == trainer_state(ref, 6)


# A long evaluation: 100 validation samples in global batches of 4, 25 micro-batches.
LONG_EVAL = [
    "data._target_=user_plugins.IndexedSamples",
    "data.kwargs.n=100",
    "model._target_=user_plugins.TinyRegressor",
    "model.kwargs.in_features=8",
    "train.metrics=[helpers_stop.SignalAtBatch]",
    "train.global_batch_size=4",
    "train.eval_mode=full",
    "train.eval_every=2",
    "train.max_steps=4",
    "train.sample_tokens=0",
    "log.every_steps=1",
    "train.device=cpu",
    "log.progress=never",
]


@pytest.mark.parametrize("every", [1, 4])
def test_a_stop_during_a_long_evaluation_cuts_it_short_and_says_so_at_once(
    tmp_path: Path, every: int
) -> None:
    """A real SIGTERM (twice) after the 3rd micro-batch of the evaluation at step 2. With log
    records every 4 steps, step 2 is between two: its steps are logged before the stop."""
    run_dir, count = tmp_path / "run", tmp_path / "count"
    args = ["train", "quickstart", *LONG_EVAL, f"log.every_steps={every}"]
    args += [f"train.run_dir={run_dir}"]
    out = cli(*args, env={"STOP_SIGNAL_AT": "3", "STOP_COUNT_FILE": str(count)})
    assert out.returncode == 143, out.stderr[-2000:]
    notice = f"SIGTERM received: stopping at the next log step (<= {every} steps) and saving"
    assert out.stderr.count(notice) == 1, out.stderr[-2000:]  # two signals, one line
    assert "evaluation at step 2 stopped after 3 micro-batch(es)" in out.stdout
    assert count.read_text() == "3"  # of 25: one process checks before every micro-batch
    assert trainer_state(run_dir, 2)["eval_owed"] is True
    val, losses = records(run_dir)
    assert val == [] and [step for step, _ in losses] == ([1, 2] if every == 1 else [2])
    again = cli(*args, env={"STOP_COUNT_FILE": str(count)})
    assert again.returncode == 0, again.stderr[-2000:]
    assert "evaluating step 2 first (owed by the stop)" in again.stdout
    val, losses = records(run_dir)
    assert [(r["step"], r["val/batches"]) for r in val] == [(2, 25.0), (4, 25.0)]
    assert [step for step, _ in losses] == ([1, 2, 3, 4] if every == 1 else [2, 4])


def _cut_on_rank_1(run_dir: str) -> dict[str, object]:
    """Rank 1 alone records a stop signal after its 3rd micro-batch of the first evaluation."""
    extra = ("data.kwargs.n=100", "train.global_batch_size=4", "train.eval_mode=full")
    return train_signalled(run_dir, rank=1, extra=extra, eval_batch=3)


@pytest.mark.distributed
def test_a_stop_on_one_rank_cuts_every_rank_s_evaluation_at_the_same_micro_batch(
    tmp_path: Path,
) -> None:
    results = run_on_ranks(_cut_on_rank_1, 2, str(tmp_path / "run"))
    # 100 samples, 2 per rank per micro-batch: 25 micro-batches each (50 in all); both stop at
    # the first agreed check after the signal, before micro-batch 16 (STOP_CHECK_BATCHES).
    assert [r["eval_batches"] for r in results] == [16, 16]
    assert [(r["end"], r["step"]) for r in results] == [("preempted", 2)] * 2
    assert trainer_state(tmp_path / "run", 2)["eval_owed"] is True
