"""The Checkpointer's I/O pieces: the threaded DCP reader, in-place loads, the reused stager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from dist_train.checkpoint.checkpointer import Checkpointer
from dist_train.checkpoint.reader import ThreadedFileSystemReader, contiguous_runs
from dist_train.checkpoint.state import loaded_in_place
from dist_train.checkpoint.train_state import TrainState
from dist_train.config.load import load_config
from dist_train.launch.env import DistEnv
from dist_train.parallel.precision import Precision

CPU1 = DistEnv(0, 0, 1, 1, torch.device("cpu"), "gloo")
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def test_contiguous_runs_split_bytes_evenly_in_order() -> None:
    items = list("abcdef")
    assert contiguous_runs(items, [1] * 6, 3) == [["a", "b"], ["c", "d"], ["e", "f"]]
    assert contiguous_runs(items, [10, 1, 1, 1, 1, 1], 2) == [["a"], ["b", "c", "d", "e", "f"]]
    assert contiguous_runs(items[:2], [5, 5], 4) == [["a"], ["b"]]  # no empty runs
    assert contiguous_runs(items, [0] * 6, 2) == [items]
    runs = contiguous_runs(items, [3, 1, 4, 1, 5, 9], 3)
    assert [x for run in runs for x in run] == items  # every item once, order kept


def _state(seed: int) -> dict[str, object]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {f"w{i}": torch.randn(50 + i, 7, generator=g) for i in range(9)},
        "extra": {"step": seed, "name": f"run{seed}"},  # non-tensor items (bytes)
        "scalar": torch.tensor(float(seed)),
    }


@pytest.mark.parametrize("threads", [1, 2, 4, 32])
def test_threaded_reader_loads_what_dcp_saved(tmp_path: Path, threads: int) -> None:
    saved = _state(1)
    dcp.save(saved, checkpoint_id=tmp_path, no_dist=True)
    into, reference = _state(2), _state(2)
    dcp.load(into, storage_reader=ThreadedFileSystemReader(tmp_path, threads), no_dist=True)
    dcp.load(reference, storage_reader=FileSystemReader(tmp_path), no_dist=True)
    for loaded in (into, reference):
        assert all(torch.equal(loaded["model"][k], v) for k, v in saved["model"].items())
        assert loaded["extra"] == saved["extra"] and torch.equal(loaded["scalar"], saved["scalar"])


def test_threaded_reader_raises_a_thread_failure(tmp_path: Path) -> None:
    dcp.save(_state(1), checkpoint_id=tmp_path, no_dist=True)
    shard = next(tmp_path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2 :] = bytes(len(data) - len(data) // 2)  # the second half zeroed
    shard.write_bytes(bytes(data))
    with pytest.raises(BaseException, match=r"(?i)zip|archive|record|pickle"):
        dcp.load(_state(2), storage_reader=ThreadedFileSystemReader(tmp_path, 4), no_dist=True)


def test_loaded_in_place_only_for_the_models_own_tensors() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    own = get_model_state_dict(model)
    assert loaded_in_place(own, model)
    assert not loaded_in_place({**own, "0.weight": own["0.weight"].clone()}, model)
    assert not loaded_in_place({**own, "extra": 3}, model)


def test_load_restores_weights_and_async_stager_reuses_its_memory(tmp_path: Path) -> None:
    cfg = load_config(
        None, [f"train.run_dir={tmp_path}", "checkpoint.async=true", "train.device=cpu"]
    )
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    opt = torch.optim.AdamW(model.parameters())
    ckpt = Checkpointer(cfg, CPU1, model, opt, Precision(cfg.precision, torch.device("cpu")))
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    staged: list[set[int]] = []
    for step in (1, 2):
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        ckpt.save(TrainState(step=step), blocking=False)
        staged.append(
            {s.data_ptr() for s in ckpt._stager._state_dict_stager._cached_storage_mapping.values()}
        )
        ckpt.wait()
        with torch.no_grad():
            model[0].weight.add_(1.0)  # step 2 must hold the newer weights
    assert staged[0] == staged[1] and len(staged[0]) >= 4  # the same staging memory both times
    moments = [opt.state[p]["exp_avg"].clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
            opt.state[p]["exp_avg"].zero_()
    state = TrainState()
    ckpt.load(tmp_path / "checkpoints/step_0000002", state)
    assert state.step == 2
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    assert all(
        torch.equal(opt.state[p]["exp_avg"], m)
        for p, m in zip(model.parameters(), moments, strict=True)
    )
    assert any(m.abs().sum() > 0 for m in moments)
    ckpt.close()
    assert ckpt._stager is None


def test_close_releases_everything_even_when_the_background_write_failed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(
        None, [f"train.run_dir={tmp_path}", "checkpoint.async=true", "train.device=cpu"]
    )
    model = nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ckpt = Checkpointer(cfg, CPU1, model, opt, Precision(cfg.precision, torch.device("cpu")))

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError("no space left on device")

    monkeypatch.setattr(dcp.FileSystemWriter, "write_data", disk_full)
    ckpt.save(TrainState(step=1), blocking=False)  # returns once staged; the write fails later
    with pytest.raises(BaseException, match="no space left"):
        ckpt.close()
    assert ckpt._stager is None and ckpt.model is None
    assert not (tmp_path / "checkpoints/step_0000001").exists()  # never committed
