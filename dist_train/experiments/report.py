"""`dist-train report`: one image of runs' curves from their metrics.jsonl, one panel per
quantity (train loss, val/loss, learning rate, throughput, MFU, gradient norm, every other
eval metric), the runs overlaid. matplotlib is an optional extra (`dist-train[report]`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from dist_train.errors import ConfigError, DistTrainError, install_hint
from dist_train.experiments.goodput_view import goodput_lines
from dist_train.experiments.grid import SWEEP_FILE, sweep_variants
from dist_train.experiments.results import (
    METRICS,
    Record,
    eval_keys,
    higher_is_better,
    read_metrics,
    series,
    write_atomic,
)
from dist_train.track.goodput import account

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
Run = tuple[str, list[Record]]  # (legend label, records)
Color = tuple[float, float, float, float]  # RGBA, as a colormap gives it


class Curve(NamedTuple):
    index: int  # of its run
    steps: list[int]
    values: list[float]


@dataclass(frozen=True)
class Panel:
    title: str
    key: str  # the metrics.jsonl key plotted
    ylabel: str
    may_log: bool = True  # log scale when its values are positive and span a decade or more
    markers: bool = False  # evaluations are sparse: show each point


def run_dirs(paths: Sequence[str], say: Callable[[str], None]) -> list[Path]:
    """Run directories as given; a sweep directory stands for its variants that have metrics."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise ConfigError("RUN_DIR", given, "no such directory")
        if not (path / SWEEP_FILE).is_file():
            found.append(path)  # read_metrics names it if it holds no run
            continue
        names = sweep_variants(path)
        ready = [path / n for n in names if (path / n / METRICS).is_file()]
        if len(ready) < len(names):
            say(
                f"note: {path}: {len(names) - len(ready)} of {len(names)} variants have no metrics yet"
            )
        if not ready:
            raise DistTrainError(f"{path}: no variant of this sweep has metrics yet")
        found += ready
    unique: dict[Path, Path] = {}  # a run given twice (or also through its sweep) plots once
    for p in found:
        unique.setdefault(p.resolve(), p)
    return list(unique.values())


def labels(dirs: Sequence[Path]) -> list[str]:
    """Each run's directory name; with the parent's name too where two share a name."""
    full = [d.resolve() for d in dirs]
    names = [d.name for d in full]
    return [
        n if names.count(n) == 1 else f"{d.parent.name}/{n}"
        for n, d in zip(names, full, strict=True)
    ]


def panels_for(runs: Sequence[Run]) -> list[Panel]:
    """The panels some run has data for, in a fixed order, then the other eval metrics."""
    records = [r for _, r in runs]
    tokens = any(series(r, "tokens_per_sec")[0] for r in records)
    rate = ("tokens_per_sec", "tokens/s") if tokens else ("samples_per_sec", "samples/s")
    fixed = [
        Panel("train loss", "loss", "loss"),
        Panel("val/loss", "val/loss", "loss", markers=True),
        Panel("learning rate", "lr", "lr", may_log=False),
        Panel(f"throughput ({rate[1]})", rate[0], rate[1], may_log=False),
        Panel("MFU", "mfu", "fraction of peak FLOPs", may_log=False),
        Panel("gradient norm", "grad_norm", "global norm"),
    ]
    evals = [
        Panel(k, k, k.removeprefix("val/"), may_log=not higher_is_better(k), markers=True)
        for k in eval_keys(records)
        if k != "val/loss"
    ]
    return [p for p in fixed + evals if any(series(r, p.key)[0] for r in records)]


def draw(runs: Sequence[Run], panels: Sequence[Panel]) -> Figure:
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI
        from matplotlib.lines import Line2D
    except ImportError as e:
        raise DistTrainError(f"dist-train report needs matplotlib ({e}){install_hint(e)}") from None
    ncols = 1 if len(panels) == 1 else 2 if len(panels) <= 4 else 3
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(5.2 * ncols, 3.4 * nrows + 0.5), dpi=110, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    palette = colormaps["tab10" if len(runs) <= 10 else "tab20"]
    colors = [palette(i % palette.N) for i in range(len(runs))]  # one color per run everywhere
    # One step range for every panel: a metric evaluated once sits where it belongs in the run.
    last = max(step for _, records in runs for step in series(records, "step")[1])
    for ax, panel in zip(axes, panels, strict=False):
        draw_panel(ax, panel, runs, colors, last)
    for ax in axes[len(panels) :]:
        fig.delaxes(ax)
    fig.legend(
        [Line2D([], [], color=c, lw=2) for c in colors],
        [label for label, _ in runs],
        loc="outside upper center",
        ncols=legend_columns([label for label, _ in runs], fig.get_figwidth()),
        frameon=False,
    )
    return fig


def legend_columns(labels: Sequence[str], width_in: float) -> int:
    """As many entries per legend row as fit across the figure (about 0.075 inch a character
    at the default font size, plus the line sample), so that short labels take one row."""
    entry_in = 0.075 * max(map(len, labels)) + 0.7
    return max(1, min(len(labels), int(width_in // entry_in)))


def draw_panel(ax: Axes, panel: Panel, runs: Sequence[Run], colors: list[Color], last: int) -> None:
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    curves: list[Curve] = []
    alone: list[tuple[str, Color]] = []
    for i, (color, (label, records)) in enumerate(zip(colors, runs, strict=True)):
        steps, values = series(records, panel.key)
        if len(steps) == 1:  # a lone dot is easy to miss and its value hard to read: say it
            who = f"{label}: " if len(runs) > 1 else ""
            alone.append((f"{who}{values[0]:.4g} at step {steps[0]}", color))
        elif steps:
            marker = "o" if panel.markers or len(steps) < 3 else None  # two points show too
            ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3.5, lw=1.4)
            curves.append(Curve(i, steps, values))
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlim(0, last * 1.03 or 1)
    ax.grid(alpha=0.3)
    write_values(ax, alone, centered=not curves)
    values = [v for c in curves for v in c.values if math.isfinite(v)]
    log = panel.may_log and bool(values) and min(values) > 0 and max(values) / min(values) >= 10
    if log:
        ax.set_yscale("log")  # a loss that falls by 10x and more reads better on a log scale
    groups = coinciding(curves, log)
    if groups:  # a curve drawn exactly under another would read as missing: say where it is
        entries = [f"{panel.key} (same for {', '.join(runs[i][0] for i in g)})" for g in groups]
        handles = [Line2D([], [], color=colors[g[-1]], lw=2) for g in groups]
        ax.legend(handles, entries, fontsize="small", framealpha=0.8)


def write_values(ax: Axes, values: Sequence[tuple[str, Color]], centered: bool) -> None:
    """One line per single-point run, in its color: large in the middle of a panel that has no
    curve (its y axis then has no ticks: there is no scale to read), else small at the top right."""
    n = len(values)
    gap = min(0.12, 0.9 / max(n, 1))
    for k, (text, color) in enumerate(values):
        if centered:
            x, y, ha, va = 0.5, 0.5 + gap * ((n - 1) / 2 - k), "center", "center"
        else:
            x, y, ha, va = 0.98, 0.96 - k * 0.08, "right", "top"
        size = "large" if centered and n <= 4 else "small"
        ax.text(x, y, text, transform=ax.transAxes, ha=ha, va=va, color=color, fontsize=size)
    if values and centered:
        ax.set_yticks([])


def coinciding(curves: Sequence[Curve], log: bool) -> list[list[int]]:
    """Groups of curves drawn on top of each other, as run indices in run order (the last one's
    line is the one seen). Two coincide where the shorter has the longer's steps over its span,
    each value within 0.5% of the panel's height of the other's (about a line's width at this
    figure size; exactly equal when every value in the panel is the same)."""

    def height(v: float) -> float:
        return math.log10(v) if log and v > 0 else v

    finite = [height(v) for c in curves for v in c.values if math.isfinite(v)]
    if len(curves) < 2 or not finite:
        return []
    tol = 0.005 * (max(finite) - min(finite))

    def on(short: Curve, long: Curve) -> bool:
        span = [k for k, s in enumerate(long.steps) if short.steps[0] <= s <= short.steps[-1]]
        if [long.steps[k] for k in span] != short.steps:
            return False
        pairs = zip(short.values, (long.values[k] for k in span), strict=True)
        return all(a == b or abs(height(a) - height(b)) <= tol for a, b in pairs)

    root = {c.index: c.index for c in curves}  # union-find: coinciding is transitive here

    def find(i: int) -> int:
        while root[i] != i:
            i = root[i]
        return i

    for k, a in enumerate(curves):
        for b in curves[k + 1 :]:
            if on(a, b) or on(b, a):
                root[find(b.index)] = find(a.index)
    groups: dict[int, list[int]] = {}
    for c in curves:
        groups.setdefault(find(c.index), []).append(c.index)
    return [g for g in groups.values() if len(g) > 1]


def report(paths: Sequence[str], out: str, say: Callable[[str], None] = print) -> list[str]:
    """Plot the runs under `paths` into `out` (written atomically); returns the panel titles.
    For a single run, first its goodput table (`goodput_view.py`)."""
    target = Path(out)
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None or target.is_dir():
        raise ConfigError("--out", out, f"expected a file name ending in {', '.join(FORMATS)}")
    dirs = run_dirs(paths, say)
    runs = [(label, read_metrics(d)) for label, d in zip(labels(dirs), dirs, strict=True)]
    if len(dirs) == 1:  # one run: where its wall time went, before the plot (which may fail)
        for line in goodput_lines(account(dirs[0])):
            say(line)
    panels = panels_for(runs)
    if not panels:
        raise DistTrainError(f"nothing to plot: no numeric metrics in {', '.join(paths)}")
    fig = draw(runs, panels)
    write_atomic(target, lambda tmp: fig.savefig(tmp, format=fmt))
    titles = [ax.get_title() for ax in fig.axes]
    say(f"wrote {target}: {len(runs)} run(s), panels: {', '.join(titles)}")
    return titles
