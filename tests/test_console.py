"""The console backend: metric lines on a pipe, a progress bar on a terminal only (a note, no
error, without tqdm), only messages without the console backend, and the real CLI's bar beside
every tracker with nothing from their libraries on either stream."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest

from dist_train.config.schema import LogConfig
from dist_train.track.console import NO_TQDM, Console
from dist_train.track.summary import ACCOUNTING, RUN_END, duration, metric_line, rate

from conftest import cli
from helpers_trackers import RUN

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
    assert list(records[0]) == ["step", "run_start"]  # the summary's record, then the metrics
    assert RUN_END in records[-1]  # goodput's closing record: metrics.jsonl's alone
    records = records[1:-1]
    shown = [line.split() for line in lines if line.startswith("step ")]
    assert [words[1] for words in shown] == [str(r["step"]) for r in records]
    assert [words[::2] for words in shown] == [console_keys(r) for r in records]  # whole
    assert all(len(line) <= 120 for line in lines if line.startswith("step "))
    bars = [line for line in lines if "/20 [" in line]
    final = re.fullmatch(
        r"100%\|\S+\| 20/20 \[(\d\d:\d\d)<00:00, *[\d.]+(step/s|s/step), loss [\d.]+\]", bars[-1]
    )
    assert final, bars[-1]  # the finished bar: elapsed<remaining (ETA), rate, the last loss
    rest = [line for line in lines if line not in bars and not line.startswith("step ")]
    summary = ["run", "model", "data", "batch", "steps", "parallel", "checkpoints", "metrics"]
    assert [line.split(":")[0] for line in rest] == ["dist-train", *summary, "done"], proc.stdout


# The console's names of metrics.jsonl's keys (the file keeps its own); samples/s is left out
# beside tok/s (a fixed multiple of it), and keys whose value is None are left out, and so are
# goodput's inputs (when a record was written, seconds in checkpoints and evaluation).
CONSOLE_NAMES = {
    "tokens_per_sec": "tok/s",
    "samples_per_sec": "samples/s",
    "elapsed_sec": "elapsed",
    "step_sec": "time/step",
    "data_wait_sec": "wait",
    "peak_mem_gb": "mem",
    "grad_norm": "gnorm",
}


def console_keys(record: dict[str, object]) -> list[str]:
    tokens = record.get("tokens_per_sec") is not None
    return [
        CONSOLE_NAMES.get(key, key)
        for key, value in record.items()
        if value is not None and not (tokens and key == "samples_per_sec") and key not in ACCOUNTING
    ]


def test_metric_lines_fit_and_read_alike() -> None:
    """Fixed significant digits with units, no None, within 120 columns for a typical line."""
    lm = {
        "step": 12000,
        "loss": 2.345678,
        "lr": 0.000392156862745098,
        "grad_norm": 0.87165,
        "samples_per_sec": 261.5,
        "tokens_per_sec": 16734.2,
        "elapsed_sec": 3725.0,
        "step_sec": 0.0362,
        "data_wait_sec": 0.00012,
        "mfu": 0.41327,
        "peak_mem_gb": 12.345,
    }
    line = metric_line(lm)
    assert line == (
        "step 12000 loss 2.346 lr 3.92e-4 gnorm 0.872 tok/s 16.7k elapsed 1h02m "
        "time/step 36.2ms wait 0.12ms mfu 41.3% mem 12.3GB"
    )
    assert len(line) <= 120
    classifier = {**lm, "tokens_per_sec": None, "loss": None, "elapsed_sec": 12.345}
    line = metric_line(classifier)
    assert "None" not in line and "tok/s" not in line and "loss" not in line
    assert "samples/s 262" in line and "elapsed 12.3s" in line
    assert metric_line({"step": 6, "val/loss": 1.23456, "val/accuracy": 0.5}) == (
        "step 6 val/loss 1.235 val/accuracy 0.5"
    )
    assert [rate(v) for v in (2e-3, 3e-4, 1.5e-5, 0.0)] == ["0.002", "3e-4", "1.5e-5", "0"]
    assert [duration(s) for s in (0.5, 1.0, 59.9, 61.0, 7200.0)] == [
        "500ms",
        "1s",
        "59.9s",
        "1m01s",
        "2h00m",
    ]
