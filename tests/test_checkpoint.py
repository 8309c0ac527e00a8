"""Checkpoints: bitwise resume, resharding, atomicity, retention, async, export, bad input."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_model

from dist_train.checkpoint import checkpointer as ckpt_module
from dist_train.checkpoint.export import load_model_weights
from dist_train.checkpoint.files import (
    check_compatible,
    check_shapes,
    complete_checkpoints,
    read_tensor_metadata,
)
from dist_train.config.load import load_config
from dist_train.config.sections import invariant_keys
from dist_train.data.build import build_data
from dist_train.errors import ConfigError, DistTrainError
from dist_train.models.registry import build_model

from conftest import cli, run_on_ranks
from helpers import TINY_GPT, assert_same_training, train_in_process

STEPS = 20
# cosine schedule and warmup (both depend on max_steps) and dropout (needs the RNG restored)
RUN = [
    *TINY_GPT,
    f"train.max_steps={STEPS}",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "optim.warmup_steps=3",
    "checkpoint.every_steps=10",
    "train.eval_every=10",
]


def steps(result: dict[str, Any], first: int) -> dict[int, float]:
    return {s: v for s, v in result["losses"].items() if s >= first}


def test_stop_and_resume_is_bitwise_identical(tmp_path: Path) -> None:
    run = [*RUN, "model.dropout=0.1"]
    full = train_in_process([*run, f"train.run_dir={tmp_path}/full"])
    assert train_in_process([*run, f"train.run_dir={tmp_path}/cut"], stop_at=10) == {
        "stopped_at": 10
    }
    assert [p.name for p in complete_checkpoints(tmp_path / "cut/checkpoints")] == ["step_0000010"]
    resumed = train_in_process([*run, f"train.run_dir={tmp_path}/cut"])
    assert steps(resumed, 11) == steps(full, 11)  # exact float equality, step by step
    assert sorted(resumed["losses"]) == list(range(11, STEPS + 1))
    assert resumed["val"] == {20: full["val"][20]}
    for name, tensor in full["params"].items():
        assert torch.equal(resumed["params"][name], tensor), name
    # the metrics file continues instead of starting over
    lines = (tmp_path / "cut/metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == list(range(1, STEPS + 1))


@pytest.mark.distributed
def test_resume_across_world_sizes_and_strategies(tmp_path: Path) -> None:
    """2 -> 1, 1 -> 2 and DDP -> FSDP2 resumes continue the same data order and track the
    uninterrupted run within float tolerance."""
    run = [*RUN, "model.dropout=0.0"]
    ref = train_in_process([*run, f"train.run_dir={tmp_path}/ref"])
    run_on_ranks(train_in_process, 2, [*run, f"train.run_dir={tmp_path}/a"], 10)
    two_to_one = train_in_process([*run, f"train.run_dir={tmp_path}/a"])
    train_in_process([*run, f"train.run_dir={tmp_path}/b"], stop_at=10)
    one_to_two = run_on_ranks(train_in_process, 2, [*run, f"train.run_dir={tmp_path}/b"])[0]
    run_on_ranks(train_in_process, 2, [*run, f"train.run_dir={tmp_path}/c"], 10)
    ddp_to_fsdp = run_on_ranks(
        train_in_process, 2, [*run, "parallel.strategy=fsdp", f"train.run_dir={tmp_path}/c"]
    )[1]
    later = {**ref, "losses": steps(ref, 11), "val": {20: ref["val"][20]}}
    for resumed in (two_to_one, one_to_two, ddp_to_fsdp):
        assert_same_training(later, resumed)


def test_crash_during_save_leaves_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = [*RUN, "checkpoint.every_steps=5", f"train.run_dir={tmp_path}"]

    def crash_before_commit(self: Any, saved: Any, tmp: Path) -> None:
        if saved.step == 10:
            raise OSError("killed mid-save")
        real_commit(self, saved, tmp)

    real_commit = ckpt_module.Checkpointer._commit
    monkeypatch.setattr(ckpt_module.Checkpointer, "_commit", crash_before_commit)
    with pytest.raises(DistTrainError, match="killed mid-save; the partial save was removed and"):
        train_in_process(run)
    monkeypatch.undo()
    root = tmp_path / "checkpoints"
    assert not (root / ".tmp_step_0000010").exists()  # shards written, never committed: gone
    assert [p.name for p in complete_checkpoints(root)] == ["step_0000005"]

    def crash_in_shard_write(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk vanished between shard writes")

    monkeypatch.setattr(
        torch.distributed.checkpoint.FileSystemWriter, "write_data", crash_in_shard_write
    )
    with pytest.raises(DistTrainError, match=r"step_0000005 is intact") as err:
        train_in_process([*run, "train.max_steps=20"])  # resumes at 5, fails saving 10
    assert "disk vanished" in str(err.value) and len(str(err.value).splitlines()) == 1
    monkeypatch.undo()
    assert [p.name for p in complete_checkpoints(root)] == ["step_0000005"]
    resumed = train_in_process([*run, "train.max_steps=12"])
    assert min(resumed["losses"]) == 6  # resumed from step 5, the newest complete one
    assert [p.name for p in complete_checkpoints(root)] == ["step_0000010", "step_0000012"]
    assert not (root / ".tmp_step_0000010").exists()  # the crash's debris went with the re-save


def test_retention_keeps_exactly_keep_last(tmp_path: Path) -> None:
    train_in_process(
        [
            *TINY_GPT,
            "train.max_steps=50",
            "checkpoint.every_steps=10",
            "checkpoint.keep_last=3",
            "train.global_batch_size=4",
            f"train.run_dir={tmp_path}",
        ]
    )
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000030", "step_0000040", "step_0000050"]


def test_async_and_sync_checkpoints_hold_identical_state(tmp_path: Path) -> None:
    base = [*RUN, "checkpoint.every_steps=5", "checkpoint.keep_last=10"]
    train_in_process([*base, f"train.run_dir={tmp_path}/sync"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train_in_process([*base, "checkpoint.async=true", f"train.run_dir={tmp_path}/async"])
    # DCP's background thread would warn about "assuming" a single process on every save
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
    for step in (5, 10, 15, 20):  # 5/10/15 async (training went on meanwhile), 20 final sync
        name = f"step_{step:07d}"
        a = load_model_weights(str(tmp_path / "sync/checkpoints" / name), "x")
        b = load_model_weights(str(tmp_path / "async/checkpoints" / name), "x")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
        assert (tmp_path / "async/checkpoints" / name / "manifest.json").is_file()


@pytest.mark.slow
def test_export_roundtrip_init_from_and_freeze(tmp_path: Path) -> None:
    run = train_in_process([*RUN, f"train.run_dir={tmp_path}/run"])
    proc = cli("export", str(tmp_path / "run"), "--out", str(tmp_path / "model.safetensors"))
    assert proc.returncode == 0, proc.stderr
    cfg = load_config(None, RUN)
    plain = build_model(cfg.model, build_data(cfg).spec)
    load_model(plain, tmp_path / "model.safetensors")  # strict; the tied head is stored once
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, run["params"][name]), name
    tuned = train_in_process(
        [
            *RUN,
            f"model.init_from={tmp_path}/model.safetensors",
            "model.freeze=[wpe.*,blocks.0.*]",
            "train.max_steps=5",
            f"train.run_dir={tmp_path}/tune",
        ]
    )
    assert tuned["losses"][1] < run["losses"][1] - 0.2  # starts from the trained weights
    for name, tensor in tuned["params"].items():
        frozen = name.startswith(("wpe.", "blocks.0."))
        assert torch.equal(tensor, run["params"][name]) == frozen, name


def test_changed_model_is_refused_before_any_collective(tmp_path: Path) -> None:
    train_in_process([*RUN, "train.max_steps=2", f"train.run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"model\.n_embd \(32 -> 64\)") as err:
        train_in_process(
            [*RUN, "model.n_embd=64", "train.global_batch_size=16", f"train.run_dir={tmp_path}"]
        )
    assert "train.global_batch_size (8 -> 16)" in str(err.value)
    # harmless settings may change
    train_in_process([*RUN, "train.max_steps=4", "log.every_steps=2", f"train.run_dir={tmp_path}"])
    # the shape check itself, as DCP would otherwise meet it mid-collective
    cfg = load_config(None, [*RUN, "model.n_embd=64"])
    other = build_model(cfg.model, build_data(cfg).spec)
    with pytest.raises(ConfigError, match=r"wte.weight \(\d+, 32\) in checkpoint vs \(\d+, 64\)"):
        check_shapes(
            {"model": other.state_dict()}, complete_checkpoints(tmp_path / "checkpoints")[-1]
        )


def test_resume_invariant_keys_come_from_the_selected_sections(tmp_path: Path) -> None:
    gpt = load_config(None, [])
    keys = set(invariant_keys(gpt))
    assert {"model.n_layer", "model.block_size", "data.path", "data.max_chars"} <= keys
    assert {"data.transform", "train.seed", "train.global_batch_size", "optim.name"} <= keys
    loading = {"data.num_workers", "data.prefetch_factor", "data.persistent_workers"}
    assert not keys & {*loading, "data.pin_memory", "model.dropout", "model.hidden_dims"}
    mlp = set(invariant_keys(load_config(None, ["model.name=mlp", "data.name=synthetic"])))
    assert {"model.hidden_dims", "data.task", "data.input_shape"} <= mlp
    assert not mlp & {"model.n_layer", "data.max_chars"}
    saved = {"config": dataclasses.asdict(gpt)}
    loads_differently = ["data.num_workers=2", "data.prefetch_factor=4", "data.pin_memory=false"]
    check_compatible(load_config(None, [*loads_differently, "train.max_steps=7"]), saved, tmp_path)
    for changed, line in [
        ("model.n_layer=2", "model.n_layer (4 -> 2)"),
        ("data.max_chars=10", "data.max_chars (2000000 -> 10)"),
        ("model.name=mlp", "model.name ('gpt' -> 'mlp')"),
    ]:
        with pytest.raises(ConfigError) as err:
            check_compatible(load_config(None, [changed]), saved, tmp_path)
        assert line in str(err.value)


# What every config.yaml and manifest of main held before per-model sections: the keys of all
# models and data sources in one flat section (the defaults of those not selected).
FLAT_MODEL = {"hidden_dims": [128, 128], "channels": [16, 32]}
FLAT_DATA = {"vocab_size": 0, "task": "classification", "num_samples": 4096}
FLAT_DATA |= {"input_shape": [32], "num_classes": 10}


def test_a_run_written_with_flat_sections_resumes_with_its_config(tmp_path: Path) -> None:
    train_in_process([*RUN, "train.max_steps=2", f"train.run_dir={tmp_path}"])
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    old["model"] |= FLAT_MODEL
    old["data"] |= FLAT_DATA
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    for path in (tmp_path / "checkpoints").glob("step_*/manifest.json"):
        manifest = json.loads(path.read_text())
        manifest["config"]["model"] |= FLAT_MODEL
        manifest["config"]["data"] |= FLAT_DATA
        path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"model\.n_layer \(2 -> 3\)") as err:
        train_in_process(["train.max_steps=4", "model.n_layer=3"], config=tmp_path / "old.yaml")
    assert "hidden_dims" not in str(err.value) and "num_samples" not in str(err.value)
    resumed = train_in_process(["train.max_steps=4"], config=tmp_path / "old.yaml")
    assert sorted(resumed["losses"]) == [3, 4]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*")}


@pytest.mark.slow
def test_bad_checkpoint_input_is_one_line_exit_2(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    base = [
        "train",
        "configs/quickstart.yaml",
        *TINY_GPT,
        "train.max_steps=4",
        "train.global_batch_size=4",
        f"train.run_dir={run_dir}",
    ]
    assert cli(*base).returncode == 0
    assert "done already" in cli(*base).stdout  # the same command again: nothing to do
    assert "done already" in cli(*base, "--nproc", "2").stdout  # decided before spawning
    proc = cli(*base, "train.max_steps=8", "model.n_layer=3", "--nproc", "2")
    assert proc.returncode == 2 and "model.n_layer (2 -> 3)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # refused in the parent, once
    shard = next((run_dir / "checkpoints/step_0000004").glob("*.distcp"))
    partial = tmp_path / "partial/checkpoints/.tmp_step_0000002"
    partial.mkdir(parents=True)
    (partial / ".metadata").write_text("x")
    cases = {
        "no such checkpoint": [f"resume={tmp_path}/missing"],
        "holds no complete checkpoint": [f"resume={tmp_path}/partial"],
    }
    before = snapshot(run_dir)
    for fragment, extra in cases.items():
        proc = cli(*base, "train.max_steps=8", *extra)
        assert proc.returncode == 2 and fragment in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    with open(shard, "r+b") as f:  # a truncated shard, as a full disk or a crash leaves it
        f.truncate(shard.stat().st_size // 2)
    before = snapshot(run_dir)
    proc = cli(*base, "train.max_steps=8")
    assert proc.returncode == 2 and "corrupted checkpoint" in proc.stderr, proc.stderr
    assert snapshot(run_dir) == before  # nothing else in the run directory touched
    proc = cli("export", str(run_dir), "--out", "/proc/not-writable/model.safetensors")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --out=")


def test_stateless_optimizer_saves_no_optimizer_state_and_resumes_exactly(tmp_path: Path) -> None:
    run = [*RUN, "optim.name=sgd", "optim.momentum=0.0", "optim.lr=0.05"]
    full = train_in_process([*run, f"train.run_dir={tmp_path}/full"])
    train_in_process([*run, f"train.run_dir={tmp_path}/cut"], stop_at=10)
    step10 = complete_checkpoints(tmp_path / "cut/checkpoints")[0]
    assert not any(
        k.startswith("optim.") for k in read_tensor_metadata(step10)
    )  # plain SGD: nothing to save, no fake step taken
    resumed = train_in_process([*run, f"train.run_dir={tmp_path}/cut"])
    assert steps(resumed, 11) == steps(full, 11)
