"""Background data loading: the same batches, in the same order, with or without worker
processes, at any world size and from any resume point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_train.config.load import load_config
from dist_train.data.build import build_data
from dist_train.data.loader import BatchLoader
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv

from conftest import cli, leftover_processes
from helpers import TINY_GPT, train_in_process

USER = ["data._target_=user_plugins.LineDataset", "model._target_=user_plugins.TinyRegressor"]


def _batches(
    workers: int, rank: int, world: int, start: int, stop: int, micro: int = 4, *extra: str
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    overrides = [*USER, f"data.num_workers={workers}", "data.prefetch_factor=3", *extra]
    cfg = load_config(None, overrides)
    data = build_data(cfg)
    env = DistEnv(rank, rank, world, world, torch.device("cpu"), "gloo")
    loader = BatchLoader(data.train, 16, 7, env, micro, cfg.data)
    try:
        per_step = 16 // world // micro
        return [loader.get(s, i) for s in range(start, stop) for i in range(per_step)]
    finally:
        loader.close()


def _global(per_rank: list[list[tuple[torch.Tensor, torch.Tensor]]], steps: int) -> list:
    """Each step's global batch: the ranks' micro-batches of that step, rank after rank."""
    n = len(per_rank[0]) // steps
    return [
        torch.cat([b[0] for r in per_rank for b in r[s * n : (s + 1) * n]]) for s in range(steps)
    ]


def test_same_batches_for_any_workers_ranks_and_resume() -> None:
    reference = _global([_batches(0, 0, 1, 0, 6)], 6)
    with_workers = _global([_batches(2, 0, 1, 0, 6)], 6)
    two_ranks = _global([_batches(2, r, 2, 0, 6) for r in range(2)], 6)
    resumed = _global([_batches(2, 0, 1, 0, 3)], 3) + _global([_batches(2, 0, 1, 3, 6)], 3)
    for other in (with_workers, two_ranks, resumed):
        assert all(torch.equal(a, b) for a, b in zip(reference, other, strict=True))
    assert not torch.equal(reference[0], reference[1])  # a real schedule, not one batch repeated


def test_random_augmentation_in_workers_is_a_function_of_the_sample_position() -> None:
    """A worker's RNG is not in the checkpoint: each sample is seeded from its place in the
    stream, so augmentations agree for 1 or 2 loading workers, 1 or 2 ranks, and a resume."""
    aug = "data.transform=user_plugins.jitter"
    one = _global([_batches(1, 0, 1, 0, 4, 4, aug)], 4)
    two = _global([_batches(2, 0, 1, 0, 4, 4, aug)], 4)
    ranks = _global([_batches(2, r, 2, 0, 4, 4, aug) for r in range(2)], 4)
    resumed = _global([_batches(2, 0, 1, 2, 4, 4, aug)], 2)
    assert all(torch.equal(a, b) for a, b in zip(one, two, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one, ranks, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(one[2:], resumed, strict=True))
    plain = _global([_batches(1, 0, 1, 0, 4)], 4)
    assert not torch.equal(one[0], plain[0])  # the augmentation did run


def test_training_is_bitwise_the_same_with_workers_and_across_a_resume(tmp_path: Path) -> None:
    """Dropout on: the loader must not touch the RNG the model draws its masks from."""
    base = [*TINY_GPT, "model.dropout=0.1", "train.max_steps=8", "log.every_steps=1"]
    base += ["train.micro_batch_size=8", "train.eval_every=4"]
    plain = train_in_process([*base, f"train.run_dir={tmp_path / 'a'}"])
    workers = [*base, "data.num_workers=2", f"train.run_dir={tmp_path / 'b'}"]
    loaded = train_in_process(workers)
    assert loaded["losses"] == plain["losses"] and loaded["val"] == plain["val"]
    resumed_dir = [*base, "data.num_workers=2", f"train.run_dir={tmp_path / 'c'}"]
    resumed_dir += ["checkpoint.every_steps=3"]
    assert train_in_process(resumed_dir, stop_at=5)["stopped_at"] == 5
    resumed = train_in_process(resumed_dir)
    assert all(resumed["losses"][s] == plain["losses"][s] for s in resumed["losses"])
    assert min(resumed["losses"]) == 4  # it did resume after the save at step 3


def test_workers_are_gone_when_the_loader_closes() -> None:
    import multiprocessing

    _batches(2, 0, 1, 0, 2)
    assert not [p for p in multiprocessing.active_children() if p.is_alive()]


def test_user_transform_and_collate() -> None:
    cfg = load_config(None, [*USER, "data.transform=user_plugins.double_target"])
    x, y = build_data(cfg).train.get_batch(torch.arange(4))
    assert torch.allclose(y, 2 * x.sum(1, keepdim=True) / 4)
    cfg = load_config(None, [*USER, "data.collate=user_plugins.StackWithMarker"])
    _, y = build_data(cfg).train.get_batch(torch.arange(4))
    assert torch.allclose(y, x.sum(1, keepdim=True) / 4 + 100)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.num_workers=-1", "data.num_workers"),
        ("data.prefetch_factor=0", "data.prefetch_factor"),
        ("data.pin_memory=sometimes", "data.pin_memory"),
        ("data.transform=user_plugins.nothing_here", "data.transform"),
    ],
)
def test_bad_loading_settings(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, [*USER, override])
    assert e.value.key == key


def test_transform_needs_a_map_style_user_dataset() -> None:
    with pytest.raises(ConfigError, match="user dataset"):
        load_config(None, ["data.transform=user_plugins.double_target"])


@pytest.mark.slow
def test_no_worker_outlives_a_cli_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = ["train.max_steps=3", "data.num_workers=2", f"train.run_dir={run_dir}"]
    out = cli("train", "quickstart", *TINY_GPT, *args)
    assert out.returncode == 0, out.stderr
    assert not leftover_processes(str(run_dir))


def test_log_records_say_how_long_steps_waited_for_data(tmp_path: Path) -> None:
    """Samples that take at least 10 ms each, read on the training thread: a step of 16 waits
    at least 0.16 s for its data, and never longer than the step itself."""
    slow = ["data._target_=user_plugins.SlowLines", "model._target_=user_plugins.TinyRegressor"]
    slow += ["model.kwargs.in_features=8", "train.global_batch_size=16", "train.max_steps=4"]
    slow += ["log.every_steps=2", "train.device=cpu", "log.progress=never"]
    slow += ["checkpoint.enabled=false", "train.eval_batches=0", f"train.run_dir={tmp_path}/r"]
    train_in_process(slow)
    lines = (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()
    records = [r for r in map(json.loads, lines) if "step_sec" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0.16 <= r["data_wait_sec"] <= r["step_sec"]
