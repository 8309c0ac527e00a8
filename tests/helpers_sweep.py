"""Shared by the sweep and report tests: a run directory holding given metrics records."""

from __future__ import annotations

import json
from pathlib import Path


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir
