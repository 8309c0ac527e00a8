"""What a finished (or stopped) run left in metrics.jsonl, read back for sweeps and reports:
the records, which of their keys are evaluation metrics, and each metric's final and best value.

No torch here: `dist-train sweep` and `dist-train report` read results without loading it.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dist_train.errors import DistTrainError
from dist_train.track.goodput import METRICS, read_records

EVAL_PREFIX = "val/"
LEGACY_EVAL = {"val_loss": "val/loss"}  # older runs wrote `val_loss`
# Words that make an evaluation metric better when higher (val/accuracy, val/f1, val/top5_acc);
# every other metric (loss, perplexity, error, ...) is better when lower.
HIGHER_IS_BETTER = {"accuracy", "acc", "f1", "precision", "recall", "auc", "score", "iou", "bleu"}

Record = dict[str, Any]


def read_metrics(run_dir: Path) -> list[Record]:
    """The run's records in file order, legacy eval keys renamed (`val_loss` -> `val/loss`).
    A line that does not parse (a run killed mid-write) is skipped, not fatal."""
    path = run_dir / METRICS
    if not path.is_file():
        raise DistTrainError(f"{run_dir}: no {METRICS} (not a run directory, or it never logged)")
    return [{LEGACY_EVAL.get(k, k): v for k, v in r.items()} for r in read_records(path)]


def is_eval_metric(key: str) -> bool:
    return key.startswith(EVAL_PREFIX)


def higher_is_better(key: str) -> bool:
    words = re.split(r"[^a-z0-9]+", key.removeprefix(EVAL_PREFIX).lower())
    return any(w in HIGHER_IS_BETTER or re.fullmatch(r"top\d+", w) for w in words)


def eval_keys(runs: Sequence[Sequence[Record]]) -> list[str]:
    """Every evaluation metric present in any run, in order of first appearance."""
    seen: dict[str, None] = {}
    for records in runs:
        for record in records:
            seen.update((k, None) for k in record if is_eval_metric(k))
    return list(seen)


def series(records: Sequence[Record], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records holding a number for `key` (nulls and NaN dropped)."""
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            steps.append(record["step"])
            values.append(float(value))
    return steps, values


def summarize(records: Sequence[Record], metrics: Sequence[str]) -> dict[str, Any]:
    """Last training step and loss; final and best of each metric in `metrics` (None if the
    run has none); see HIGHER_IS_BETTER for what best means."""
    steps, losses = series(records, "loss")
    row: dict[str, Any] = {"steps": steps[-1] if steps else None}
    row["loss"] = losses[-1] if losses else None
    for key in metrics:
        _, values = series(records, key)
        best = max if higher_is_better(key) else min
        row[key] = values[-1] if values else None
        row[f"best {key}"] = best(values) if values else None
    return row


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` then rename over `path`: a reader never sees half a file, and an
    interrupted write leaves the previous one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def cell(value: Any) -> str:
    """A table cell: 4 significant digits for numbers, `-` for nothing."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Aligned text columns, numbers right-aligned."""
    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in [list(columns), *cells]) for i in range(len(columns))]
    numeric = [
        all(isinstance(row.get(c), (int, float)) or row.get(c) is None for row in rows)
        for c in columns
    ]

    def line(items: Sequence[str]) -> str:
        return "  ".join(
            s.rjust(w) if right else s.ljust(w)
            for s, w, right in zip(items, widths, numeric, strict=True)
        ).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(
                {c: "" if row.get(c) is None else row[c] for c in columns} for row in rows
            )

    return write_atomic(path, write)
