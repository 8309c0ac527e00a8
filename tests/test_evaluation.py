"""Evaluation metrics: exact across ranks (sums reduced, never averages of averages), every
validation sample counted once in full mode at any world size."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dist_train.config.load import load_config
from dist_train.data.loader import EverySampleOnce
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv, dist_session, read_env
from dist_train.train.evaluation import ClassificationMetrics, LossMetric, MetricSums

from conftest import run_on_ranks
from helpers import train_in_process

N, CLASSES = 11, 4
LOGITS = torch.randn(N, CLASSES, generator=torch.Generator().manual_seed(3))
TARGETS = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 0, 1, 3])


def _by_hand() -> dict[str, float]:
    """The metrics of all N samples in one place, written out from their definitions."""
    pred = LOGITS.argmax(1).tolist()
    true = TARGETS.tolist()
    loss = -sum(math.log(torch.softmax(LOGITS[i], 0)[true[i]].item()) for i in range(N)) / N
    labels = sorted(set(true) | set(pred))
    precisions, recalls, f1s = [], [], []
    for c in labels:
        tp = sum(p == c and t == c for p, t in zip(pred, true, strict=True))
        predicted, actual = pred.count(c), true.count(c)
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        precisions.append(p)
        recalls.append(r)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return {
        "val/loss": loss,
        "val/accuracy": sum(p == t for p, t in zip(pred, true, strict=True)) / N,
        "val/precision": sum(precisions) / len(labels),
        "val/recall": sum(recalls) / len(labels),
        "val/f1": sum(f1s) / len(labels),
    }


def _rank_metrics() -> dict[str, float]:
    """This rank's share of a full pass (global batch 4, micro-batch 1, so the last batch of
    3 is uneven and padded), reduced over ranks."""
    env = read_env("cpu")
    with dist_session(env, timeout_s=60):
        sums = MetricSums([LossMetric("classification"), ClassificationMetrics()])
        for _, _, indices, _, real in EverySampleOnce(N, 4, env, 1):
            sums.add(LOGITS[indices], TARGETS[indices], real)
        return sums.reduce(env)


@pytest.mark.distributed
def test_metrics_over_ranks_equal_the_hand_computed_ones() -> None:
    expected = _by_hand()
    for got in [_rank_metrics_single(), *run_on_ranks(_rank_metrics, 2)]:
        for key, value in expected.items():
            tolerance = 1e-6 if key == "val/loss" else 1e-12  # float32 logits; counts exact
            assert got[key] == pytest.approx(value, rel=tolerance), key


def _rank_metrics_single() -> dict[str, float]:
    env = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
    sums = MetricSums([LossMetric("classification"), ClassificationMetrics()])
    for _, _, indices, _, real in EverySampleOnce(N, 4, env, 3):
        sums.add(LOGITS[indices], TARGETS[indices], real)
    return sums.reduce(env)


def test_full_pass_pads_the_last_batch_and_counts_each_sample_once() -> None:
    for world in (1, 2, 3):
        seen: list[int] = []
        shapes = set()
        for rank in range(world):
            env = DistEnv(rank, rank, world, world, torch.device("cpu"), "gloo")
            keys = list(EverySampleOnce(10, 6, env, 2))
            shapes.add(tuple(len(k[2]) for k in keys))
            seen += [i for k in keys for i in k[2][: k[4]].tolist()]
        assert sorted(seen) == list(range(10)), world
        assert len(shapes) == 1, world  # every rank runs the same forward passes


PLUGINS = [
    "data._target_=user_plugins.IndexedSamples",
    "model._target_=user_plugins.TinyRegressor",
    "model.kwargs.in_features=8",
    "train.metrics=[user_plugins.SampleCounter]",
    "train.global_batch_size=6",
    "train.max_steps=1",
    "train.device=cpu",
    "log.progress=never",
    "checkpoint.enabled=false",
]


def _evaluate_on_rank(run_dir: str, mode: str) -> dict[str, float]:
    return train_in_process([*PLUGINS, f"train.run_dir={run_dir}", f"train.eval_mode={mode}"])[
        "val_metrics"
    ][1]


@pytest.mark.distributed
def test_every_validation_sample_counted_once_at_1_2_and_3_workers(tmp_path: Path) -> None:
    n = 10
    for world in (1, 2, 3):
        run_dir = str(tmp_path / f"w{world}")
        got = (
            run_on_ranks(_evaluate_on_rank, world, run_dir, "auto")[0]
            if world > 1
            else _evaluate_on_rank(run_dir, "auto")
        )
        assert got["val/count"] == n, world
        assert got["val/id_sum"] == n * (n - 1) / 2, world
        assert got["val/id_squares"] == (n - 1) * n * (2 * n - 1) / 6, world


def test_sampled_mode_draws_eval_batches_global_batches(tmp_path: Path) -> None:
    got = _evaluate_on_rank(str(tmp_path / "s"), "sampled")
    assert got["val/count"] == 4 * 6  # train.eval_batches (4) x global batch: with repeats


def test_bad_metric_and_mode() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.metrics=[user_plugins.NoSuchMetric]"])
    assert e.value.key == "train.metrics"
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.eval_mode=every"])
    assert e.value.key == "train.eval_mode"
