"""Best checkpoint and early stopping: decided alike on every rank from the reduced metrics,
kept through retention and across a resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from dist_train.config.load import load_config
from dist_train.errors import ConfigError

from conftest import cli, run_on_ranks
from helpers import EARLY_STOPPING, SELECTION_RUN, train_in_process

RUN, EARLY = SELECTION_RUN, EARLY_STOPPING


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))


def test_best_checkpoint_is_kept_through_retention(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    best = ["checkpoint.best.metric=val/count", "checkpoint.keep_last=1"]
    train_in_process(
        [*RUN, *best, "train.max_steps=8", "checkpoint.every_steps=2", f"train.run_dir={run_dir}"]
    )
    assert _steps(run_dir) == [2, 8]  # keep_last=1 alone would leave only step 8
    assert os.readlink(run_dir / "checkpoints" / "best") == "step_0000002"
    manifest = json.loads((run_dir / "checkpoints" / "step_0000008" / "manifest.json").read_text())
    assert manifest["trainer"]["watches"]["best"] == {"value": 10.0, "step": 2, "evals_since": 3}


def _early(run_dir: str) -> dict[str, object]:
    return train_in_process([*RUN, *EARLY, f"train.run_dir={run_dir}"])


@pytest.mark.distributed
def test_early_stopping_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    results = run_on_ranks(_early, 2, str(tmp_path / "run"))
    for result in results:
        assert max(result["losses"]) == 6  # best at 2; no improvement at 4 and 6: patience 2
        assert sorted(result["val_metrics"]) == [2, 4, 6]
    assert 6 in _steps(tmp_path / "run")  # the last state is saved


def test_early_stopping_counts_across_a_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = [*RUN, *EARLY, "checkpoint.every_steps=2", f"train.run_dir={run_dir}"]
    assert train_in_process(args, stop_at=5)["stopped_at"] == 5
    resumed = train_in_process(args)  # from step 4, one evaluation without improvement known
    assert max(resumed["losses"]) == 6


@pytest.mark.slow
def test_early_stopping_as_the_user_sees_it(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = cli("train", "quickstart", *RUN, *EARLY, f"train.run_dir={run_dir}")
    assert first.returncode == 0, first.stderr
    assert (
        "early stopping at step 6: val/count did not improve by more than 0 in 2 evaluation(s); "
        "best val/count 10 at step 2"
    ) in first.stdout
    again = cli("train", "quickstart", *RUN, *EARLY, f"train.run_dir={run_dir}")
    assert again.returncode == 0 and "stopped early at step 6" in again.stdout


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.early_stopping.metric=loss", "train.early_stopping.metric"),
        ("train.early_stopping.patience=0", "train.early_stopping.patience"),
        ("checkpoint.best.mode=lowest", "checkpoint.best.mode"),
    ],
)
def test_bad_selection_settings(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key


def test_a_metric_the_evaluation_does_not_have_is_one_line_before_training(
    tmp_path: Path,
) -> None:
    run_dir = tmp_path / "run"
    out = cli(
        "train",
        "quickstart",
        *RUN,
        "train.max_steps=2",
        "checkpoint.best.metric=val/acc",
        f"train.run_dir={run_dir}",
    )
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "error: checkpoint.best.metric='val/acc': not a metric of this run's evaluation (val/loss"
        )
    )


def test_checkpoints_off_turn_the_shipped_best_checkpoint_off() -> None:
    """The quickstart keeps a best checkpoint; `checkpoint.enabled=false` alone runs it unsaved
    (no error asking to unset checkpoint.best too), and nothing watches for a best."""
    from dist_train.train.selection import BEST, Watches, check_watched

    shipped = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    assert load_config(shipped, []).checkpoint.best.metric == "val/loss"
    cfg = load_config(shipped, ["checkpoint.enabled=false"])
    check_watched(cfg, has_val=False, names=None)  # no validation set: nothing to watch either
    assert BEST not in Watches(cfg, {}).each
    assert BEST in Watches(load_config(shipped, []), {}).each
