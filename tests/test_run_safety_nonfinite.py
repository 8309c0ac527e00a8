"""Non-finite training is stopped before it is saved: the stop names the step and keeps only
finite checkpoints, NaN in the data stops every rank, skips are counted and give up after a run
of them, and an fp16 loss scale collapse warns once."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_train.checkpoint.export import load_model_weights
from dist_train.checkpoint.files import complete_checkpoints
from dist_train.errors import NonFiniteError

from conftest import run_on_ranks
from helpers import train_in_process
from helpers_run_safety import RUN, records


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_model_weights(str(path), "x").values())


def test_nonfinite_stop_names_the_step_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    run = [
        *RUN,
        "optim.lr=1e9",
        "optim.grad_clip=0",
        "checkpoint.every_steps=1",
        f"train.run_dir={tmp_path}",
        "checkpoint.keep_last=1",
    ]
    with pytest.raises(NonFiniteError, match=r"not finite at step \d+|loss is nan in steps"):
        train_in_process(run)
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert saved and all(all_finite(p) for p in saved)  # retention kept the last finite one
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON (no NaN tokens)


def test_nan_in_the_data_stops_on_every_rank(tmp_path: Path) -> None:
    run = [
        "train.device=cpu",
        "model._target_=user_plugins.TinyRegressor",
        "model.kwargs.in_features=8",
        "data._target_=user_plugins.PoisonedLineDataset",
        "train.global_batch_size=256",
        "train.max_steps=3",
        "log.every_steps=1",
        "log.progress=never",
        "checkpoint.enabled=false",
        f"train.run_dir={tmp_path}",
    ]
    with pytest.raises(AssertionError) as err:  # both ranks fail, each with the same error
        run_on_ranks(train_in_process, 2, run)
    assert "ranks exited [1, 1]" in str(err.value)
    assert (
        str(err.value).count(
            "NonFiniteError: train.on_nonfinite=stop: the training loss is nan in steps 1..1"
        )
        == 2
    )


def test_nonfinite_skip_counts_and_gives_up_after_a_run_of_skips(tmp_path: Path) -> None:
    run = [
        *RUN,
        "train.on_nonfinite=skip",
        "train.max_nonfinite_skips=3",
        "optim.lr=1e9",
        "optim.grad_clip=0",
        "train.max_steps=30",
        f"train.run_dir={tmp_path}",
    ]
    with pytest.raises(NonFiniteError, match=r"4 updates in a row .*max_nonfinite_skips=3"):
        train_in_process(run)
    logged = [r for r in records(tmp_path) if "run_start" not in r]  # the metric records
    assert logged[-1]["nonfinite_skips"] >= 3
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in logged)


def test_fp16_loss_scale_collapse_warns_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = [
        *RUN,
        "precision.dtype=fp16",
        "precision.warn_loss_scale=1e30",
        f"train.run_dir={tmp_path}",
        "train.max_steps=3",
    ]
    train_in_process(run)
    out = capfd.readouterr().out
    assert out.count("warning: the fp16 loss scale fell to") == 1
