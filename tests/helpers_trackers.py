"""Shared by the tracker tests: the tiny run, metrics.jsonl's series (what every tracker must
hold), a training run with given backends, and each library's own reader of what it wrote
(TensorBoard's event files, W&B's offline run files, MLflow's sqlite store)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from dist_train.track.summary import ACCOUNTING

from helpers import TINY_GPT, train_in_process

RUN = [
    *TINY_GPT,
    "train.max_steps=6",
    "train.global_batch_size=4",
    "log.every_steps=2",
    "train.eval_every=3",
    "train.sample_tokens=0",
    "model.dropout=0.0",
]


def jsonl_series(run_dir: Path) -> dict[str, dict[int, float]]:
    """key -> {step: value} of metrics.jsonl's finite numbers but goodput's inputs (when, and
    how long: not curves): what every tracker must hold."""
    series: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        for key, value in record.items():
            if key in ("step", *ACCOUNTING):
                continue
            if isinstance(value, int | float) and math.isfinite(value):
                series.setdefault(key, {})[record["step"]] = value
    return series


def assert_same_series(got: dict[str, dict[int, float]], want: dict[str, dict[int, float]]) -> None:
    """`got`: a tracker's; `want`: metrics.jsonl's, whose training keys the trackers name
    `train/...` beside the evaluation's `val/...`."""
    want = {key if "/" in key else f"train/{key}": points for key, points in want.items()}
    assert got.keys() == want.keys() and "train/loss" in want and "val/loss" in want
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


def tensorboard_text(log_dir: Path, tag: str) -> list[tuple[int, str]]:
    """(step, text) of each `add_text(tag, ...)`, as TensorBoard's reader has them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"tensors": 0})
    acc.Reload()
    events = acc.Tensors(f"{tag}/text_summary")
    return [(e.step, e.tensor_proto.string_val[0].decode()) for e in events]


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
