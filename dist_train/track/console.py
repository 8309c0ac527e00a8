"""Rank 0's console: one line per metrics record, notes, and a tqdm progress bar (rate, ETA) that
the lines do not break. Without tqdm there is no bar, only the lines (the bar is cosmetic)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from dist_train.track.summary import RUN_START, metric_line, summary_lines

NO_TQDM = "note: no progress bar without tqdm (pip install 'dist-train[progress]')"


class Console:
    def __init__(
        self, stream: TextIO | None, progress: str, max_steps: int, enabled: bool, lines: bool
    ) -> None:
        """`progress`: auto (a bar on a terminal only) | always | never; `lines`: print a line
        per metrics record (the `console` backend); `enabled`: False on other ranks."""
        # sys.stdout as it is now (not at import): redirections and test captures see it
        self.stream, self.max_steps = stream or sys.stdout, max_steps
        self.enabled, self.lines = enabled, lines
        tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        wanted = enabled and (progress == "always" or (progress == "auto" and tty))
        # Into a file (progress=always, e.g. a batch job's log) each redraw stays as a line.
        self.redraw_s = 0.1 if tty else 1.0
        self.tqdm: Any = None  # the tqdm class while a bar is wanted and not finished
        # Created at the first step, so that its rate and ETA count training only.
        self.progress_bar: Any = None
        self.postfix = ""
        if wanted:
            try:
                from tqdm import tqdm
            except ImportError:
                self.print(NO_TQDM)
            else:
                self.tqdm = tqdm

    def log(self, record: dict[str, Any]) -> None:
        if RUN_START in record:  # the run summary: a message, shown whatever the backends
            self.print("\n".join(summary_lines(record[RUN_START])))
            return
        loss = record.get("loss")
        if isinstance(loss, float):  # None when every update of the interval was skipped
            self.postfix = f"loss {loss:.4f}"
            if self.progress_bar is not None:  # drawn at its next redraw, not now
                self.progress_bar.set_postfix_str(self.postfix, refresh=False)
        if self.lines:
            self.print(metric_line(record))

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.write(text, file=self.stream)  # clears the bar, writes, redraws it
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def bar(self, step: int) -> None:
        """Called every step: tqdm redraws at most every `redraw_s` seconds (its
        mininterval), so a step costs an addition and a clock read."""
        if self.tqdm is None:
            return
        if self.progress_bar is None:
            self.progress_bar = self.tqdm(
                total=self.max_steps,
                initial=step - 1,
                unit="step",
                file=self.stream,
                mininterval=self.redraw_s,
                postfix=self.postfix or None,
            )
        self.progress_bar.update(step - self.progress_bar.n)
        if step >= self.max_steps:  # the last step: what follows (evaluation, sample) is lines
            self.close(finished=True)

    def close(self, finished: bool) -> None:
        if self.progress_bar is not None:
            self.progress_bar.close()
            self.progress_bar = None
            self.tqdm = None
