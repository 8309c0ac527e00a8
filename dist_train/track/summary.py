"""How numbers and the run summary read on the console: fixed significant digits with units
(`tok/s 16.7k`, `time/step 36.2ms`), and the `run_start` facts as a block of short lines."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

RUN_START = "run_start"  # the metrics record that holds the run summary's facts
RUN_END = "run_end"  # metrics.jsonl's last record of an attempt that ended in order (goodput)
# Goodput's inputs (track/goodput.py): when a record was written (Unix time); an evaluation's
# seconds; since the last record, seconds blocked in checkpoint saves, generating the end-of-run
# sample, and in evaluations a stop cut short. Kept in metrics.jsonl, left off the console and
# the trackers: they are not curves.
ACCOUNTING = ("wall_time", "eval_sec", "checkpoint_sec", "sample_sec", "lost_sec")
TRACKER_PREFIX = "train/"  # trackers: training scalars beside the evaluation's `val/...`


def tracker_key(key: str) -> str:
    """A record key as the trackers name it: `loss` -> `train/loss`; `val/loss` stays.
    metrics.jsonl keeps the bare keys (what results, sweeps and reports read)."""
    return key if "/" in key else TRACKER_PREFIX + key


def sig(value: float, digits: int = 3) -> str:
    """`digits` significant digits, without a trailing `.0` or exponent clutter for 1e-3..1e5."""
    return f"{value:.{digits}g}"


def rate(value: float) -> str:
    """A learning rate: 3 significant digits, small ones as 3.92e-4 (shorter than 0.000392)."""
    if value == 0 or abs(value) >= 1e-3:
        return sig(value)
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{sig(float(mantissa))}e{int(exponent)}"


def si(value: float) -> str:
    """3 significant digits with k/M/G from a thousand on: 16734.2 -> 16.7k."""
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{sig(value / scale)}{suffix}"
    return sig(value)


def duration(seconds: float) -> str:
    """36.2ms, 1.48s, 2m05s, 1h02m: 3 significant digits below a minute, clock units above."""
    if seconds < 1:
        return f"{sig(seconds * 1000)}ms"
    if seconds < 60:
        return f"{sig(seconds)}s"
    minutes = int(seconds // 60)
    if minutes < 60:
        return f"{minutes}m{int(seconds % 60):02d}s"
    return f"{minutes // 60}h{minutes % 60:02d}m"


# Console label and format of the known record keys; others keep their key, 4 digits.
FIELDS: dict[str, tuple[str, Callable[[float], str]]] = {
    "loss": ("loss", lambda v: sig(v, 4)),
    "lr": ("lr", rate),
    "grad_norm": ("gnorm", sig),
    "samples_per_sec": ("samples/s", si),
    "tokens_per_sec": ("tok/s", si),
    "elapsed_sec": ("elapsed", duration),
    "step_sec": ("time/step", duration),
    "data_wait_sec": ("wait", duration),
    "mfu": ("mfu", lambda v: f"{sig(v * 100)}%"),
    "peak_mem_gb": ("mem", lambda v: f"{sig(v)}GB"),
    "loss_scale": ("loss_scale", si),
}


def metric_field(key: str, value: Any) -> str | None:
    """`label value` of one record field for the console; None: nothing to show (a None
    value, e.g. tokens_per_sec of a classifier, or an interval whose updates were all skipped)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, float):
        return f"{key} {value}"
    label, show = FIELDS.get(key, (key, lambda v: sig(v, 4) if abs(v) < 1e5 else si(v)))
    return f"{label} {show(value)}"


def metric_line(record: dict[str, Any]) -> str:
    """One record as one console line. tok/s makes samples/s redundant (a fixed multiple):
    it is left out there, which keeps a typical line within 120 columns."""
    skip = "samples_per_sec" if record.get("tokens_per_sec") is not None else None
    fields = (metric_field(k, v) for k, v in record.items() if k != skip and k not in ACCOUNTING)
    return " ".join(f for f in fields if f is not None)


def _count(n: int) -> str:
    return f"{n:,}"


def summary_lines(facts: dict[str, Any]) -> list[str]:
    """The run summary (at most ~12 lines of under 100 columns, paths aside)."""
    f = facts
    resumed = f.get("resumed_from")
    start = f"resumed at step {f['start_step']} from {resumed}" if resumed else "fresh start"
    trainable = f["trainable"]
    train_part = (
        "all trainable" if trainable == f["parameters"] else f"{_count(trainable)} trainable"
    )
    per = f" of {f['tokens_per_sample']} tokens" if f.get("tokens_per_sample") else ""
    tokens = f", {_count(f['tokens_per_step'])} tokens" if f.get("tokens_per_step") else ""
    ckpt = "off (checkpoint.enabled=false)"
    if f["checkpoint_enabled"]:
        every = f"every {f['checkpoint_every']} steps" if f["checkpoint_every"] else "at the end"
        best = f", best by {f['checkpoint_best']}" if f.get("checkpoint_best") else ""
        ckpt = f"{every}{best}, keep last {f['keep_last']}" + (", async" if f["async"] else "")
    lines = [
        f"run: {f['run_dir']} ({start})",
        f"model: {f['model']}, {_count(f['parameters'])} parameters ({train_part})",
        *([f"init_from: {f['init_from']}"] if f.get("init_from") else []),
        f"data: {f['data']}: {_count(f['train_samples'])} train / "
        f"{_count(f['val_samples'])} val samples{per}",
        f"batch: {f['global_batch_size']} per step{tokens} = {f['world_size']} "
        f"worker{'s' if f['world_size'] > 1 else ''} x {f['micro_batch_size']} micro-batch x "
        f"{f['accumulation_steps']} accumulation",
        f"steps: {_count(f['max_steps'])} ({sig(f['epochs'])} epochs), "
        f"evaluation {f['evaluation']}",
        f"parallel: {f['strategy']}, precision {f['precision']}, on {f['devices']}",
        f"checkpoints: {ckpt}",
        f"metrics: {', '.join(f['backends'])}",
    ]
    return lines
