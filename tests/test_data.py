"""Datasets and the sampler whose global batches depend only on (seed, step)."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train.config.load import load_config
from dist_train.data.build import build_data, default_corpus
from dist_train.data.sampler import GlobalBatchSampler
from dist_train.errors import ConfigError


def test_global_batches_identical_for_world_sizes_1_and_2() -> None:
    s1, s2 = GlobalBatchSampler(1000, 32, seed=7), GlobalBatchSampler(1000, 32, seed=7)
    for step in range(100):  # spans three epochs
        one = s1.rank_indices(step, 0, 1)
        two = torch.cat([s2.rank_indices(step, r, 2) for r in range(2)])
        assert torch.equal(one, two)
        assert torch.equal(one, GlobalBatchSampler(1000, 32, seed=7).global_indices(step))


def test_sampler_covers_each_epoch_once_and_depends_on_seed() -> None:
    s = GlobalBatchSampler(100, 10, seed=1)
    first_epoch = torch.cat([s.global_indices(step) for step in range(10)])
    assert sorted(first_epoch.tolist()) == list(range(100))
    crossing = GlobalBatchSampler(95, 10, seed=1).global_indices(9)  # epoch 0 tail + epoch 1 head
    assert len(crossing) == 10
    assert not torch.equal(GlobalBatchSampler(100, 10, 2).global_indices(0), s.global_indices(0))


def test_text_file_windows_and_split(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("hello world, héllo wörld! " * 40, encoding="utf-8")
    cfg = load_config(
        None, [f"data.path={tmp_path}/t.txt", "model.block_size=8", "data.val_fraction=0.25"]
    )
    data = build_data(cfg)
    assert data.spec.task == "lm" and data.spec.vocab_size == len(set("hello world, héllo wörld! "))
    x, y = data.train.get_batch(torch.tensor([0, 5]))
    assert x.shape == (2, 8) and torch.equal(x[:, 1:], y[:, :-1])
    assert data.spec.decode(x[0].tolist()) == "hello wo"
    assert data.spec.decode(data.spec.encode("héllo wörld")) == "héllo wörld"
    total = len(data.train) + len(data.val) + 2 * 8
    assert total == 40 * 26 and len(data.val) == 40 * 26 // 4 - 8


def test_default_corpus_is_python_source() -> None:
    text = default_corpus(50_000)
    assert len(text) == 50_000 and "def " in text and "import" in text


def test_nanogpt_token_files(tmp_path: Path) -> None:
    np.arange(1000, dtype=np.uint16).__mod__(50).astype(np.uint16).tofile(tmp_path / "train.bin")
    np.arange(200, dtype=np.uint16).__mod__(50).astype(np.uint16).tofile(tmp_path / "val.bin")
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": 64, "itos": {i: chr(65 + i) for i in range(64)}}, f)
    cfg = load_config(None, ["data.name=tokens", f"data.path={tmp_path}", "model.block_size=16"])
    data = build_data(cfg)
    assert data.spec.vocab_size == 64 and len(data.train) == 1000 - 16 and len(data.val) == 200 - 16
    x, y = data.train.get_batch(torch.tensor([3]))
    assert x.dtype == torch.int64 and x[0, 0].item() == 3 and y[0, -1].item() == 19
    assert data.spec.decode([0, 1]) == "AB"


def test_token_dir_without_train_bin(tmp_path: Path) -> None:
    cfg = load_config(None, ["data.name=tokens", f"data.path={tmp_path}"])
    with pytest.raises(ConfigError, match=r"train\.bin"):
        build_data(cfg)


def test_text_too_short_for_block(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_text("tiny")
    cfg = load_config(None, [f"data.path={tmp_path}/t.txt", "model.block_size=64"])
    with pytest.raises(ConfigError, match="too short"):
        build_data(cfg)


def test_synthetic_is_deterministic_and_split() -> None:
    cfg = load_config(
        None,
        [
            "data.name=synthetic",
            "data.num_samples=100",
            "data.val_fraction=0.2",
            "data.input_shape=[3,4,4]",
        ],
    )
    a, b = build_data(cfg), build_data(cfg)
    assert len(a.train) == 80 and len(a.val) == 20
    xa, ya = a.train.get_batch(torch.arange(5))
    xb, yb = b.train.get_batch(torch.arange(5))
    assert xa.shape == (5, 3, 4, 4) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert a.spec.num_outputs == 10 and a.spec.input_shape == (3, 4, 4)


def test_user_map_style_dataset() -> None:
    cfg = load_config(None, ["data._target_=user_plugins.LineDataset", "data.kwargs.n=40"])
    data = build_data(cfg)
    x, y = data.train.get_batch(torch.tensor([1, 2, 3]))
    assert x.shape == (3, 8) and y.shape == (3, 1) and data.spec.task == "regression"


def test_torchvision_style_dataset_by_per_split_kwargs() -> None:
    """A dataset that takes `train=` instead of `split=`: per-split kwargs, over `kwargs`."""
    base = ["data._target_=user_plugins.TorchvisionStyle"]
    both = load_config(None, [*base, "data.train_kwargs.train=true", "data.val_kwargs.train=false"])
    data = build_data(both)
    assert data.val is not None and data.spec.task == "regression"
    x_train, _ = data.train.get_batch(torch.tensor([0]))
    x_val, _ = data.val.get_batch(torch.tensor([0]))
    assert not torch.equal(x_train, x_val)  # two splits, as the dataset's own argument says
    assert build_data(load_config(None, [*base, "data.train_kwargs.train=true"])).val is None
    with pytest.raises(ConfigError, match=r"^data._target_=.*takes data.train_kwargs and"):
        build_data(load_config(None, base))  # split= does not fit: the message says what does
    with pytest.raises(ConfigError, match=r"^data.train_kwargs=\{'train': True, 'bogus': 1\}"):
        build_data(
            load_config(None, [*base, "data.train_kwargs.train=true", "data.train_kwargs.bogus=1"])
        )


@pytest.mark.slow
def test_torchvision_style_dataset_trains_from_the_cli(tmp_path: Path) -> None:
    from conftest import cli

    proc = cli(
        "train",
        "configs/mlp_synthetic.yaml",
        "data._target_=user_plugins.TorchvisionStyle",
        "data.train_kwargs.train=true",
        "data.val_kwargs.train=false",
        "model._target_=user_plugins.TinyRegressor",
        "model.kwargs.in_features=8",
        "train.max_steps=4",
        f"train.run_dir={tmp_path}/run",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "val/loss" in (tmp_path / "run" / "metrics.jsonl").read_text()
