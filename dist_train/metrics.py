"""Rank-0 metrics: `metrics.jsonl`, one console line per log step, a progress bar on a TTY."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from dist_train.config import LogConfig


class MetricsLogger:
    """Writes only on the main rank; other ranks get a logger that does nothing."""

    def __init__(self, run_dir: Path | None, cfg: LogConfig, max_steps: int,
                 stream: TextIO = sys.stdout, append: bool = False) -> None:
        self.enabled = run_dir is not None
        self.stream, self.max_steps = stream, max_steps
        self.file: TextIO | None = None
        if run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(run_dir / "metrics.jsonl", "a" if append else "w")  # noqa: SIM115
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.progress = self.enabled and (cfg.progress == "always" or (cfg.progress == "auto" and tty))
        self._last_bar = 0.0
        self._bar_shown = False

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        assert self.file is not None
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.print(" ".join(_fmt(k, v) for k, v in record.items()))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar_shown:  # finish the bar's line before printing below it
            self.stream.write("\n")
            self._bar_shown = False
        self.stream.write(text + "\n")
        self.stream.flush()

    def bar(self, step: int, loss: float | None) -> None:
        """Redraw at most ten times a second so the bar costs nothing per step."""
        if not self.progress:
            return
        now = time.monotonic()
        if now - self._last_bar < 0.1 and step < self.max_steps:
            return
        self._last_bar = now
        filled = int(30 * step / self.max_steps)
        tail = f" loss {loss:.4f}" if loss is not None else ""
        self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {step}/{self.max_steps}{tail}")
        self.stream.flush()
        self._bar_shown = True

    def close(self) -> None:
        if self._bar_shown:
            self.stream.write("\n")
        if self.file is not None:
            self.file.close()
            self.file = None


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.0f}"
    return f"{key} {value}"
