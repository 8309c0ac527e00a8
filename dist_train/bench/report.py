"""A benchmark's result: every raw figure as JSON on disk, a readable table on the terminal."""

from __future__ import annotations

import json
import math
import platform
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from dist_train.bench.stats import round_medians, summarize


@dataclass(frozen=True)
class Column:
    key: str  # a field of each row
    header: str
    scale: float = 1.0  # display unit: seconds shown as milliseconds is scale=1e3
    fmt: str = ".3g"


@dataclass
class BenchReport:
    name: str
    settings: dict[str, Any]  # what was run, on what: enough to reproduce and to compare runs
    rows: list[dict[str, Any]]  # one per contender: raw samples and their summaries
    columns: list[Column]
    ratios: dict[str, dict[str, Any]] = field(default_factory=dict)  # label -> ratio_summary
    notes: list[str] = field(default_factory=list)  # lines printed under the table

    def to_json(self) -> dict[str, Any]:
        return {
            "benchmark": self.name,
            "settings": self.settings,
            "results": self.rows,
            "ratios": self.ratios,
            "notes": self.notes,
        }


def machine_info() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": torch.multiprocessing.cpu_count(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "time_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def timing_rows(
    step_times: Mapping[str, Sequence[Sequence[float]]],
    samples_per_step: Mapping[str, int],
    tokens_per_sample: int = 0,
) -> list[dict[str, Any]]:
    """Rows for training contenders: step time in seconds (one figure per round, the median of
    its steps; every step's time is kept too) and throughput, each with median and spread."""
    rows = []
    for name, rounds in step_times.items():
        times = round_medians(rounds)
        samples = [samples_per_step[name] / t for t in times]
        row: dict[str, Any] = {
            "name": name,
            "samples_per_step": samples_per_step[name],
            "step_time_s": summarize(times),
            "samples_per_sec": summarize(samples),
            "step_time_s_per_round": times,
            "step_times_s": [list(r) for r in rounds],
        }
        if tokens_per_sample:
            row["tokens_per_sec"] = summarize([s * tokens_per_sample for s in samples])
        rows.append(row)
    return rows


TIMING_COLUMNS = [
    Column("step_time_s.median", "step ms", 1e3, ".2f"),
    Column("step_time_s.q1", "q1 ms", 1e3, ".2f"),
    Column("step_time_s.q3", "q3 ms", 1e3, ".2f"),
    Column("step_time_s.min", "min ms", 1e3, ".2f"),
    Column("samples_per_sec.median", "samples/s", 1.0, ".1f"),
]


def _lookup(row: Mapping[str, Any], dotted: str) -> Any:
    value: Any = row
    for part in dotted.split("."):
        value = value[part]
    return value


def _cell(value: Any, column: Column) -> str:
    if value is None:  # not measured (the notes say why)
        return "-"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return format(value * column.scale, column.fmt)
    return str(value)


def format_table(report: BenchReport) -> str:
    headers = ["", *(c.header for c in report.columns)]
    body = [
        [str(row["name"]), *(_cell(_lookup(row, c.key), c) for c in report.columns)]
        for row in report.rows
    ]
    widths = [max(len(line[i]) for line in [headers, *body]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        cols = (c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))
        return "  ".join([first.ljust(widths[0]), *cols])

    lines = [f"== bench {report.name} ==", line(headers), line(["-" * w for w in widths])]
    lines += [line(cells) for cells in body]
    for label, r in report.ratios.items():
        lines.append(
            f"{label}: {r['median']:.3f}  (per-round q1-q3 {r['q1']:.3f}-{r['q3']:.3f}, "
            f"min-max {r['min']:.3f}-{r['max']:.3f}; ratio of medians "
            f"{r['ratio_of_medians']:.3f})"
        )
    lines += report.notes
    return "\n".join(lines)


def _finite(obj: Any) -> Any:
    """JSON has no NaN or infinity: write them as null rather than as invalid JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(report: BenchReport, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(report.to_json()), indent=2, allow_nan=False) + "\n")
    return path
