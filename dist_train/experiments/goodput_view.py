"""`dist-train report RUN`'s goodput: where the run's wall time went, as a table (seconds, % and a
bar per category) under one line with goodput = productive step time / wall time."""

from __future__ import annotations

from dist_train.track.goodput import CATEGORIES, Goodput
from dist_train.track.summary import duration

BAR_WIDTH = 30


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`[#####.....]`: `fraction` of `width` filled, rounded to whole characters."""
    filled = round(max(0.0, min(1.0, fraction)) * width)
    return "[" + "#" * filled + "." * (width - filled) + "]"


def attempts_phrase(result: Goodput) -> str:
    """`2 attempts (1 restart by torchrun)`: restarts by torchrun's agent, resumes by a command
    run again (a requeued job, a user)."""
    resumes = result.attempts - 1 - result.restarts
    kinds = [
        f"{n} {word}{'s' if n > 1 else ''}"
        for n, word in ((result.restarts, "restart by torchrun"), (resumes, "resume"))
        if n > 0
    ]
    plural = "s" if result.attempts > 1 else ""
    return f"{result.attempts} attempt{plural}" + (f" ({', '.join(kinds)})" if kinds else "")


def goodput_lines(result: Goodput) -> list[str]:
    """The report's goodput block, or one line saying the run recorded no clock."""
    if not result.attempts:
        return [
            "goodput: not recorded (no run_start record with the run's clock in metrics.jsonl: "
            "written by an earlier dist-train)"
        ]
    wall = result.wall
    label_width = max(map(len, CATEGORIES.values()))
    lines = [
        f"goodput {result.goodput:.2f}: productive steps over {duration(wall)} of wall time, "
        f"{attempts_phrase(result)}",
        f"{'category':<{label_width}}  {'seconds':>9}  {'%':>6}",
    ]
    for key, label in CATEGORIES.items():
        seconds = result.seconds[key]
        share = seconds / wall if wall > 0 else 0.0
        lines.append(f"{label:<{label_width}}  {seconds:9.2f}  {share * 100:5.1f}%  {bar(share)}")
    if result.between > 0:
        lines.append(
            f"not counted: {duration(result.between)} between attempts, when no process of the "
            "run ran (a queue, a later rerun)"
        )
    return lines
