"""What ships with the project works as shipped: every config at 1 and 2 workers, saving
periodically and naming its target machine; the test suite's own hygiene guard, and the
package's version and config lookup."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from dist_train.config.load import load_config
from dist_train.config.yaml_io import resolve_config_path, shipped_configs_dir
from dist_train.errors import ConfigError

from conftest import REPO, fingerprint_changes, run_on_ranks, tree_fingerprint
from helpers import train_in_process

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# Two steps of each config as shipped (model, data, batch split, accumulation): only the length,
# evaluation, sampling and checkpoints are cut, and the text corpus is capped.
SHORT = [
    "train.device=cpu",
    "train.max_steps=2",
    "train.eval_every=0",
    "train.eval_batches=1",
    "train.sample_tokens=0",
    "checkpoint.enabled=false",
    'checkpoint.best.metric=""',  # a best checkpoint needs checkpoints
    "log.progress=never",
    "log.every_steps=1",
]


def train_config(path: Path, run_dir: str) -> dict[int, float]:
    # only the text source has a corpus to cap (another source's section has no such key)
    cap = ["data.max_chars=200000"] if hasattr(load_config(path).data, "max_chars") else []
    return train_in_process([*SHORT, *cap, f"train.run_dir={run_dir}"], config=path)["losses"]


@pytest.mark.slow
@pytest.mark.distributed
def test_every_shipped_config_trains_at_one_and_two_workers(tmp_path: Path) -> None:
    assert {p.stem for p in CONFIGS} >= {"quickstart", "gpt_char", "mlp_synthetic", "cnn_synthetic"}
    for path in CONFIGS:
        # One process group per spawn: re-creating a group on one port races between ranks.
        one = train_config(path, str(tmp_path / "one" / path.stem))
        two = run_on_ranks(train_config, 2, path, str(tmp_path / "two" / path.stem))
        assert sorted(one) == [1, 2] and all(0 < v < float("inf") for v in one.values()), path
        assert all(sorted(rank) == [1, 2] for rank in two), path


def test_every_shipped_config_saves_periodically_and_states_its_target() -> None:
    """A stop or crash of a shipped run loses at most one save interval, and the comment at the
    top says where it is meant to run (minutes on 2 CPU cores, or one GPU) before anyone starts it
    on the wrong machine."""
    target = re.compile(r"(a|\d+) minutes? on 2 CPU cores|on one GPU", re.IGNORECASE)
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.checkpoint.enabled and 0 < cfg.checkpoint.every_steps < cfg.train.max_steps, path
        lines = path.read_text().splitlines()
        header = " ".join(line for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
        assert target.search(header), f"{path.name}: no target in its opening comment"


def test_shipped_configs_resolve_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: the shipped ones are found by name
    assert shipped_configs_dir().resolve() == (REPO / "configs").resolve()
    for given in ("configs/quickstart.yaml", "quickstart.yaml", "quickstart"):
        assert resolve_config_path(given).resolve() == (REPO / "configs/quickstart.yaml").resolve()
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/quickstart.yaml").write_text("train:\n  max_steps: 3\n")
    assert load_config("configs/quickstart.yaml").train.max_steps == 3  # a user's own file wins
    with pytest.raises(
        ConfigError,
        match="file not found; expected a YAML file or a shipped "
        r"config \(cnn_synthetic, gpt_char, mlp_synthetic, quickstart\)",
    ):
        load_config("configs/nope.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path))


def test_repo_guard_sees_created_changed_and_deleted_files(tmp_path: Path) -> None:
    (tmp_path / "runs/a").mkdir(parents=True)
    (tmp_path / "runs/a/metrics.jsonl").write_text("{}\n")
    before = tree_fingerprint(tmp_path)
    assert fingerprint_changes(before, tree_fingerprint(tmp_path)) == []
    (tmp_path / "bench_results").mkdir()
    assert fingerprint_changes(before, tree_fingerprint(tmp_path)) == ["bench_results"]
    before = tree_fingerprint(tmp_path)
    with (tmp_path / "runs/a/metrics.jsonl").open("a") as f:
        f.write("{}\n")
    assert fingerprint_changes(before, tree_fingerprint(tmp_path)) == ["runs/a/metrics.jsonl"]
    before = tree_fingerprint(tmp_path)
    (tmp_path / "runs/a/metrics.jsonl").unlink()
    assert fingerprint_changes(before, tree_fingerprint(tmp_path)) == [
        "runs/a",
        "runs/a/metrics.jsonl",
    ]
