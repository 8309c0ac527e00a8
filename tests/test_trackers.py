"""Experiment trackers: each one's files, read back with the library's own reader, hold what
metrics.jsonl holds (same steps, same values) and the resolved config; resume continues the
same tracker runs; only rank 0 tracks; a missing library is one line; the console bar."""

from __future__ import annotations

import io
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dist_train.config.load import load_config
from dist_train.config.schema import LogConfig, RunConfig
from dist_train.errors import ConfigError
from dist_train.track.backend import scalars
from dist_train.track.console import NO_TQDM, Console
from dist_train.track.trackers import flat_config

from conftest import REPO, TINY_GPT, cli, run_on_ranks, train_in_process

RUN = [
    *TINY_GPT,
    "train.max_steps=6",
    "train.global_batch_size=4",
    "log.every_steps=2",
    "train.eval_every=3",
    "train.sample_chars=0",
    "model.dropout=0.0",
]


def jsonl_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """key -> {step: value} of metrics.jsonl's finite numbers: what every tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, {})[record["step"]] = value
    return series


def assert_same_series(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    assert got.keys() == want.keys() and "loss" in want and "val/loss" in want
    for key, points in want.items():
        assert sorted(got[key]) == sorted(points), key
        for step, value in points.items():
            assert got[key][step] == pytest.approx(value, rel=1e-6), (key, step)


def train(run_dir: Path, backends: str, *extra: str, stop_at: int | None = None) -> None:
    train_in_process(
        [*RUN, f"train.run_dir={run_dir}", f"log.backends=[{backends}]", *extra], stop_at
    )


# --- readers: each library's own ---------------------------------------------------------


def tensorboard_series(log_dir: Path) -> tuple[dict[str, dict[int, float]], dict[str, Any]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    series: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step twice"
        series[tag] = {e.step: e.value for e in events}
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    start = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info
    hparams = {k: getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    return series, hparams


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of an offline run's .wandb file, decoded by wandb's own `Record`.
    The file is a LevelDB-style log (wandb's transaction log): a 7-byte ':W&B' header, then
    32 KiB blocks of records, each a 7-byte header (crc32, length, type) and its payload;
    a payload that spans blocks is split FIRST/MIDDLE/LAST."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos, payload, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            records.append(wandb_internal_pb2.Record.FromString(payload))
            payload = b""
    return records


def wandb_items(items: Any) -> dict[str, Any]:
    """A record's key/value items; W&B stores a key either whole or as its nested parts."""
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_run(run_dir: Path) -> tuple[str, dict[str, dict[int, float]], dict[str, Any], int]:
    """(run id, history, config, exit code) of the run's offline run directories, in order."""
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert files, "no offline W&B run"
    ids, series, config, exit_code = set(), {}, {}, None
    for path in files:
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                ids.add(record.run.run_id)
            elif kind == "config":
                config.update(wandb_items(record.config.update))
            elif kind == "history":
                row = wandb_items(record.history.item)
                for key, value in row.items():
                    if not key.startswith("_"):  # W&B's own: _step, _runtime, _timestamp
                        series.setdefault(key, {})[row["_step"]] = value
            elif kind == "exit":
                exit_code = record.exit.exit_code
    assert len(ids) == 1, ids
    return ids.pop(), series, config, exit_code


def mlflow_runs(run_dir: Path) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dist_train")
    return [client, *client.search_runs([experiment.experiment_id])]


def mlflow_history(client: Any, run: Any) -> dict[str, list[tuple[int, float]]]:
    """key -> [(step, value), ...] in the order logged (a step may repeat after a resume)."""
    history = {key: client.get_metric_history(run.info.run_id, key) for key in run.data.metrics}
    return {key: [(m.step, m.value) for m in metrics] for key, metrics in history.items()}


# --- each tracker, against metrics.jsonl ---------------------------------------------------


def test_tensorboard_holds_the_metrics_and_hyperparameters(tmp_path: Path) -> None:
    train(tmp_path, "jsonl,tensorboard")
    series, hparams = tensorboard_series(tmp_path / "tensorboard")
    assert_same_series(series, jsonl_series(tmp_path))
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
    assert [step for step, _ in history["loss"]] == [1, 2, 3, 4, 5, 4, 5, 6]
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
    assert scalars(record) == {"lr": 0.1, "n": 3.0}  # any numeric key, not a fixed list
    flat = flat_config(RunConfig())
    assert flat["optim.lr"] == RunConfig().optim.lr and flat["resume"] == "auto"
    assert flat["optim.betas"] == "[0.9, 0.95]" and flat["model._target_"] == "null"
    assert all(isinstance(v, bool | int | float | str) for v in flat.values())


# --- the console: lines and bar ---------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def visible_lines(text: str) -> list[str]:
    """What a terminal shows: each line's text after its last carriage return."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n")]


def test_console_bar_on_a_terminal_only(monkeypatch: pytest.MonkeyPatch) -> None:
    pipe, tty = io.StringIO(), Tty()
    for stream in (pipe, tty):
        console = Console(stream, "auto", 4, enabled=True, lines=True)
        for step in range(1, 5):
            console.bar(step)
            if step % 2 == 0:
                console.log({"step": step, "loss": 1.5})
        console.close(finished=True)
    assert pipe.getvalue() == "step 2 loss 1.5\nstep 4 loss 1.5\n"  # a pipe: only the lines
    assert "\r" in tty.getvalue() and re.search(r"4/4 \[.*step/s, loss 1\.5000\]", tty.getvalue())
    assert [line for line in visible_lines(tty.getvalue()) if line.startswith("step")] == [
        "step 2 loss 1.5",
        "step 4 loss 1.5",
    ]
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed: lines and a note, no error
    out = io.StringIO()
    console = Console(out, "always", 4, enabled=True, lines=True)
    console.bar(1)
    console.log({"step": 1, "loss": 2.0})
    assert out.getvalue() == f"{NO_TQDM}\nstep 1 loss 2\n"
    silent = Console(out, "always", 4, enabled=False, lines=True)  # another rank
    silent.bar(1)
    silent.log({"step": 1})
    assert out.getvalue() == f"{NO_TQDM}\nstep 1 loss 2\n"


def test_without_the_console_backend_only_messages_print(tmp_path: Path) -> None:
    from dist_train.track.metrics import MetricsLogger

    out = io.StringIO()
    logger = MetricsLogger(tmp_path, LogConfig(backends=["jsonl"], progress="never"), 4, out)
    logger.log({"step": 1, "loss": 2.0})
    logger.print("a note")
    logger.close()
    assert out.getvalue() == "a note\n"
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.0}


@pytest.mark.slow
def test_cli_bar_with_every_tracker(tmp_path: Path) -> None:
    """The real CLI, log.progress=always into a pipe: whole metric lines, a bar with rate and
    ETA, and nothing from the trackers' libraries on either stream."""
    run = tmp_path / "run"
    proc = cli(
        "train",
        "configs/quickstart.yaml",
        *RUN,
        "train.max_steps=20",
        "log.every_steps=5",
        "log.progress=always",
        "log.backends=[jsonl,console,tensorboard,wandb,mlflow]",
        f"train.run_dir={run}",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    # Text mode reads each carriage return as a line break: the bar's redraws and tqdm's
    # blanking of it are lines of their own, and a metric line broken by the bar would show.
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shown = [line.split() for line in lines if line.startswith("step ")]
    assert [words[1] for words in shown] == [str(r["step"]) for r in records]
    assert [words[::2] for words in shown] == [list(r) for r in records]  # every key, whole
    bars = [line for line in lines if "/20 [" in line]
    final = re.fullmatch(
        r"100%\|\S+\| 20/20 \[(\d\d:\d\d)<00:00, *[\d.]+(step/s|s/step), loss [\d.]+\]", bars[-1]
    )
    assert final, bars[-1]  # the finished bar: elapsed<remaining (ETA), rate, the last loss
    rest = [line for line in lines if line not in bars and not line.startswith("step ")]
    assert [line.split(":")[0] for line in rest] == ["dist-train", "done"], proc.stdout
