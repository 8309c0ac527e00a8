"""Experiment trackers: each one's files, read back with the library's own reader, hold what
metrics.jsonl holds (same steps, same values) and the resolved config; resume continues the
same tracker runs; only rank 0 tracks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_train.config.load import load_config

from conftest import run_on_ranks
from helpers_trackers import (
    assert_same_series,
    jsonl_series,
    mlflow_history,
    mlflow_runs,
    tensorboard_series,
    tensorboard_text,
    train,
    wandb_run,
)

# --- each tracker, against metrics.jsonl ---------------------------------------------------


def test_tensorboard_holds_the_metrics_and_hyperparameters(tmp_path: Path) -> None:
    train(tmp_path, "jsonl,tensorboard")
    series, hparams = tensorboard_series(tmp_path / "tensorboard")
    assert_same_series(series, jsonl_series(tmp_path))
    assert "train/loss" in series and "train/lr" in series and "loss" not in series
    ((step, text),) = tensorboard_text(tmp_path / "tensorboard", "run_start")  # the summary
    assert step == 0 and "    model: GPT, " in text and f"    run: {tmp_path} (fresh" in text
    cfg = load_config(tmp_path / "config.yaml")
    assert hparams["optim.lr"] == pytest.approx(cfg.optim.lr)
    assert hparams["log.backends"] == '["jsonl", "tensorboard"]'
    assert not (tmp_path / "wandb").exists() and not (tmp_path / "mlflow.db").exists()
    assert not (tmp_path / "trackers.json").exists()  # nothing to continue for TensorBoard


def test_wandb_offline_run_holds_the_metrics_and_config(tmp_path: Path) -> None:
    train(tmp_path, "jsonl,wandb")
    run_id, series, config, exit_code = wandb_run(tmp_path)
    assert_same_series(series, jsonl_series(tmp_path))
    cfg = load_config(tmp_path / "config.yaml")
    assert config["optim.lr"] == pytest.approx(cfg.optim.lr)
    assert config["optim.decay_steps"] == cfg.optim.decay_steps == 6  # resolved, not 0
    assert exit_code == 0
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"wandb": run_id}


def test_mlflow_run_holds_the_metrics_and_params(tmp_path: Path) -> None:
    train(tmp_path, "jsonl,mlflow")
    client, *runs = mlflow_runs(tmp_path)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == tmp_path.name
    history = mlflow_history(client, run)
    assert all(len(dict(points)) == len(points) for points in history.values())  # steps once
    assert_same_series({k: dict(points) for k, points in history.items()}, jsonl_series(tmp_path))
    cfg = load_config(tmp_path / "config.yaml")
    assert float(run.data.params["optim.lr"]) == pytest.approx(cfg.optim.lr)
    assert run.data.params["resume"] == "auto"
    assert "    model: GPT, " in run.data.tags["mlflow.note.content"]  # the run summary
    assert json.loads((tmp_path / "trackers.json").read_text()) == {"mlflow": run.info.run_id}


# --- resume: the same tracker runs continue --------------------------------------------------


@pytest.mark.slow
def test_a_resumed_run_continues_its_tracker_runs(tmp_path: Path) -> None:
    """Interrupted after step 5 with a checkpoint at 3: steps 4 and 5 are logged twice."""
    resumable = ["log.every_steps=1", "checkpoint.every_steps=3"]
    train(tmp_path, "jsonl,tensorboard,wandb,mlflow", *resumable, stop_at=5)
    ids = json.loads((tmp_path / "trackers.json").read_text())
    client, *runs = mlflow_runs(tmp_path)
    assert [run.info.status for run in runs] == ["KILLED"]  # stopped short of max_steps
    train(tmp_path, "jsonl,tensorboard,wandb,mlflow", *resumable)
    want = jsonl_series(tmp_path)
    assert sorted(want["loss"]) == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "trackers.json").read_text()) == ids

    # TensorBoard: the same directory; the first attempt's steps after 3 are purged.
    series, _ = tensorboard_series(tmp_path / "tensorboard")
    assert_same_series(series, want)

    # W&B: a second offline run directory with the same run id; the later rows win.
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
    run_id, series, _, exit_code = wandb_run(tmp_path)
    assert run_id == ids["wandb"] and exit_code == 0
    assert_same_series(series, want)

    # MLflow: the same run, finished now; its history keeps both attempts' steps 4 and 5.
    client, *runs = mlflow_runs(tmp_path)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(ids["mlflow"], "FINISHED")]
    history = mlflow_history(client, runs[0])
    assert [step for step, _ in history["train/loss"]] == [1, 2, 3, 4, 5, 4, 5, 6]
    assert_same_series({k: dict(points) for k, points in history.items()}, want)  # later wins


# --- rank 0 only -----------------------------------------------------------------------------


def _two_rank_run(run_dir: str) -> None:
    train(Path(run_dir), "jsonl,tensorboard,wandb")


@pytest.mark.distributed
def test_only_rank_zero_tracks(tmp_path: Path) -> None:
    run_on_ranks(_two_rank_run, 2, str(tmp_path))
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list((tmp_path / "wandb").glob("offline-run-*"))) == 1
    series, _ = tensorboard_series(tmp_path / "tensorboard")
    assert_same_series(series, jsonl_series(tmp_path))
