"""Shared by the run-safety tests: the tiny run, its metrics records, a directory's snapshot,
and a one-line exit-2 error."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from helpers import TINY_GPT

RUN = [
    *TINY_GPT,
    "train.max_steps=10",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "optim.warmup_steps=0",
]
QUICK = ["configs/quickstart.yaml", *RUN, "data.max_chars=50000"]


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_line(proc: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    return lines[0]
