"""Rank-0 metrics: `metrics.jsonl`, one console line per log step, a progress bar on a TTY."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from dist_train.config import LogConfig
from dist_train.errors import DistTrainError

METRICS = "metrics.jsonl"
DISCARDED = "metrics.discarded.jsonl"  # records of attempts that a resume rolled back


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN or Infinity: such values become null, and `nonfinite` names the keys."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def append_line(fd: int, line: str, path: Path) -> None:
    """Append one whole line or nothing: a failed or short write (a full disk) is cut back to
    where the file ended, so the file never holds half a record."""
    data = line.encode()
    end = os.fstat(fd).st_size
    try:
        written = 0
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError as e:
        os.ftruncate(fd, end)
        raise DistTrainError(f"{path}: {e.strerror or e} while writing metrics") from None


def trim_metrics(run_dir: Path, step: int) -> int:
    """Make metrics.jsonl read as one run resumed at `step`: records after it (from the attempt
    that was interrupted) and any unreadable line move to metrics.discarded.jsonl. Returns how
    many moved."""
    path = run_dir / METRICS
    if not path.is_file():
        return 0
    keep, drop = [], []
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False
        (keep if ok else drop).append(line)
    if drop:
        with open(run_dir / DISCARDED, "a") as f:
            f.writelines(line + "\n" for line in drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(drop)


class MetricsLogger:
    """Writes only on the main rank; other ranks get a logger that does nothing."""

    def __init__(
        self,
        run_dir: Path | None,
        cfg: LogConfig,
        max_steps: int,
        stream: TextIO | None = None,
    ) -> None:
        """Appends to RUN_DIR/metrics.jsonl (trimmed to the resumed step by `trim_metrics`)."""
        self.enabled = run_dir is not None
        # sys.stdout as it is now (not at import): redirections and test captures see it
        self.stream, self.max_steps = stream or sys.stdout, max_steps
        self.fd: int | None = None
        self.path = run_dir / METRICS if run_dir is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        tty = hasattr(stream, "isatty") and stream.isatty()
        self.progress = self.enabled and (
            cfg.progress == "always" or (cfg.progress == "auto" and tty)
        )
        self._last_bar = 0.0
        self._bar_shown = False

    def log(self, record: dict[str, Any]) -> None:
        if self.fd is None or self.path is None:
            return
        append_line(self.fd, json.dumps(strict_record(record), allow_nan=False) + "\n", self.path)
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
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# Dense bf16/fp16 tensor-core peaks (no sparsity), TFLOP/s per device, by name fragment.
KNOWN_PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "A100": 312.0,
    "L40S": 362.0,
    "A10G": 125.0,
    "L4": 121.0,
}


def peak_flops(cfg: LogConfig, device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one device for MFU: the configured value, else a known GPU's bf16/fp16
    peak. CPUs have no single honest figure, so there is no MFU unless one is given."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda" and dtype in ("bf16", "fp16"):
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in KNOWN_PEAK_TFLOPS.items():
            if fragment in name:
                return tflops * 1e12
    return None


def mfu(tokens_per_sec: float, flops_per_token: float, peak: float, world_size: int) -> float:
    """Model FLOPs utilization: achieved training FLOP/s over the peak of all devices."""
    return tokens_per_sec * flops_per_token / (peak * world_size)


def _fmt(key: str, value: Any) -> str:
    if isinstance(value, float):
        return f"{key} {value:.4g}" if abs(value) < 1e5 else f"{key} {value:.0f}"
    return f"{key} {value}"


def peak_memory(device: torch.device) -> dict[str, float]:
    """`peak_mem_gb`: the CUDA allocator's peak since the last log step (then reset); a host
    query of the allocator's counters, no device sync. Nothing on devices without one."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gb": peak}
