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
