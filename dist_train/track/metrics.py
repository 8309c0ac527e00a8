"""Rank-0 metrics: each record to `metrics.jsonl`, the console and the configured trackers;
throughput and MFU helpers."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TextIO

import torch

from dist_train.config.schema import LogConfig
from dist_train.errors import DistTrainError
from dist_train.track.backend import Backend, Tracker
from dist_train.track.console import Console
from dist_train.track.goodput import DISCARDED, METRICS
from dist_train.track.summary import RUN_END, RUN_START


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


def trim_metrics(run_dir: Path, step: int, into: Path | None = None) -> int:
    """Make metrics.jsonl read as one run resumed at `step`: records after it (from the attempt
    that was interrupted) and any unreadable line are appended to `into` (default
    metrics.discarded.jsonl), never dropped. Returns how many moved."""
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
        with open(into or run_dir / DISCARDED, "a") as f:
            f.writelines(line + "\n" for line in drop)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, path)
    return len(drop)


class JsonlFile:
    """The `jsonl` backend, always on: metrics.jsonl, one whole line per record."""

    def __init__(self, path: Path) -> None:
        """Appends (a resumed run's file is first trimmed to its step by `trim_metrics`)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def log(self, record: dict[str, Any]) -> None:
        assert self.fd is not None, "logged after close"
        append_line(self.fd, json.dumps(strict_record(record), allow_nan=False) + "\n", self.path)

    def close(self, finished: bool) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class MetricsLogger:
    """Hands each record to every backend: metrics.jsonl first (the source of truth), the
    console, then the trackers. Only the main rank writes; other ranks get one that does
    nothing (`run_dir` None)."""

    def __init__(
        self,
        run_dir: Path | None,
        cfg: LogConfig,
        max_steps: int,
        stream: TextIO | None = None,
        trackers: Sequence[Tracker] = (),
        summary: dict[str, Any] | None = None,
    ) -> None:
        """`summary`: the run summary's facts, logged by `start` as the `run_start` record."""
        enabled = run_dir is not None
        self.summary = summary if enabled else None
        self.max_steps, self.last_step = max_steps, 0
        lines = "console" in cfg.backends
        self.console = Console(stream, cfg.progress, max_steps, enabled, lines)
        self.jsonl = JsonlFile(run_dir / METRICS) if run_dir is not None else None
        self.backends: list[Backend] = (
            [self.jsonl, self.console, *trackers] if self.jsonl is not None else []
        )

    def log(self, record: dict[str, Any]) -> None:
        self.last_step = max(self.last_step, record["step"])
        for backend in self.backends:
            backend.log(record)

    def start(self, step: int, timing: dict[str, Any] | None = None) -> None:
        """Before the first step: the run summary, once, to every backend (the console shows
        it as a block of lines, trackers as the run's summary) at the step the run starts at,
        so that a resume's `trim_metrics` keeps it with the records before that step.
        `timing`: facts known only now (when the loop's clock started), added to the summary."""
        if self.summary is not None:
            self.log({"step": step, RUN_START: {**self.summary, **(timing or {})}})
            self.summary = None

    def end(self, step: int, how: str, timing: dict[str, Any]) -> None:
        """The attempt's `run_end` record (`how` it ended), to metrics.jsonl only: it closes the
        goodput accounting of the time after the last log step (the final save, a stop's save);
        the console has its own closing line."""
        if self.jsonl is not None:
            self.jsonl.log({"step": step, RUN_END: how, **timing})

    def print(self, text: str) -> None:
        """A message, not a metric: on the console of the main rank whatever the backends."""
        self.console.print(text)

    def bar(self, step: int) -> None:
        self.console.bar(step)

    def close(self, finished: bool | None = None) -> None:
        """Closes every backend, also when one of them fails (that error is raised after)."""
        if finished is None:  # an early stop says so: it ends before max_steps, finished
            finished = self.last_step >= self.max_steps
        backends, self.backends = self.backends, []
        with ExitStack() as stack:
            for backend in reversed(backends):  # the stack closes them in reverse: in order
                stack.callback(backend.close, finished)


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


def peak_memory(device: torch.device) -> dict[str, float]:
    """`peak_mem_gb`: the CUDA allocator's peak since the last log step (then reset); a host
    query of the allocator's counters, no device sync. Nothing on devices without one."""
    if device.type != "cuda":
        return {}
    peak = torch.cuda.max_memory_allocated(device) / 1e9
    torch.cuda.reset_peak_memory_stats(device)
    return {"peak_mem_gb": peak}
