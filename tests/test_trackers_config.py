"""Experiment tracker configuration: a missing library, an unknown backend or mode, or a tracker
that cannot start is one line, before anything starts; trackers get finite numbers and the flat
config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.config.load import load_config
from dist_train.config.schema import RunConfig
from dist_train.errors import ConfigError
from dist_train.track.backend import scalars
from dist_train.track.trackers import flat_config

from conftest import REPO, cli
from helpers_trackers import train

# --- configuration errors: one line, before anything starts ----------------------------------


@pytest.mark.parametrize("library", ["tensorboard", "wandb", "mlflow"])
def test_a_missing_library_names_its_extra(monkeypatch: pytest.MonkeyPatch, library: str) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # what importlib reports when not installed
    with pytest.raises(ConfigError) as error:
        load_config(None, [f"log.backends=[jsonl,{library}]"])
    message = str(error.value)
    assert message.startswith("log.backends=['jsonl', '" + library) and "\n" not in message
    assert message.endswith(
        f"{library} needs {library}, not installed here: pip install 'dist-train[{library}]'"
    )
    load_config(None, ["log.backends=[jsonl,console]"])  # no tracker asked for: no error


MISSING_WANDB = """
import sys
sys.modules["wandb"] = None  # as if not installed
from dist_train.cli.main import main
main(sys.argv[1:])
"""


@pytest.mark.slow
def test_the_cli_says_which_extra_in_one_line(tmp_path: Path) -> None:
    run = f"train.run_dir={tmp_path}/run"
    proc = subprocess.run(
        [sys.executable, "-c", MISSING_WANDB, "train", "quickstart", run, "log.backends=[wandb]"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},  # the checkout under test
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [
        "error: log.backends=['wandb']: wandb needs wandb, not installed here: "
        "pip install 'dist-train[wandb]'"
    ]
    assert not (tmp_path / "run").exists()  # found before anything started
    proc = cli("check", "quickstart", run, "log.backends=[jsonl,tensorbored]")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "unknown backend 'tensorbored'; expected any of jsonl, console, " in proc.stderr


def test_mlflow_sqlite_store_needs_sqlalchemy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(
        ConfigError, match=r"mlflow needs sqlalchemy, not installed here: .*dist-train\[mlflow\]"
    ):
        load_config(None, ["log.backends=[mlflow]"])
    load_config(None, ["log.backends=[mlflow]", "log.mlflow_uri=http://127.0.0.1:5000"])


def test_unknown_backend_and_wandb_mode() -> None:
    with pytest.raises(ConfigError, match="unknown backend 'neptune'; expected any of jsonl, "):
        load_config(None, ["log.backends=[jsonl,neptune]"])
    with pytest.raises(ConfigError, match=r"log.wandb_mode='cloud': expected one of offline, "):
        load_config(None, ["log.wandb_mode=cloud"])


def test_a_tracker_that_cannot_start_is_one_line(tmp_path: Path) -> None:
    """A store MLflow cannot open: the run ends before training, in one line naming it."""
    bad_uri = "log.mlflow_uri=nosuch://host/x"  # no MLflow store has this scheme
    with pytest.raises(ConfigError, match=r"^log.backends='mlflow': could not start: ") as e:
        train(tmp_path / "run", "jsonl,mlflow", bad_uri)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --- what trackers receive ------------------------------------------------------------------


def test_trackers_get_finite_numbers_and_the_flat_config() -> None:
    record = {"step": 4, "loss": None, "val/loss": float("nan"), "lr": 0.1, "n": 3, "ok": True}
    # any numeric key, not a fixed list; training scalars as train/... beside val/...
    assert scalars(record) == {"train/lr": 0.1, "train/n": 3.0}
    flat = flat_config(RunConfig())
    assert flat["optim.lr"] == RunConfig().optim.lr and flat["resume"] == "auto"
    assert flat["optim.betas"] == "[0.9, 0.95]" and flat["model._target_"] == "null"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())
