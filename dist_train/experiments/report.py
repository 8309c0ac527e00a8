"""`dist-train report`: one image of runs' curves from their metrics.jsonl, one panel per
quantity (train loss, val/loss, learning rate, throughput, MFU, gradient norm, every other
eval metric), the runs overlaid. matplotlib is an optional extra (`dist-train[report]`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dist_train.errors import ConfigError, DistTrainError, install_hint
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

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
Run = tuple[str, list[Record]]  # (legend label, records)


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


def draw_panel(ax: Axes, panel: Panel, runs: Sequence[Run], colors: list, last: int) -> None:
    from matplotlib.ticker import MaxNLocator

    for color, (label, records) in zip(colors, runs, strict=True):
        steps, values = series(records, panel.key)
        marker = "o" if panel.markers or len(steps) < 3 else None  # a lone point shows too
        ax.plot(steps, values, color=color, label=label, marker=marker, markersize=3.5, lw=1.4)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    ax.set_xlim(0, last * 1.03 or 1)
    ax.grid(alpha=0.3)
    values = [v for _, r in runs for v in series(r, panel.key)[1]]
    if panel.may_log and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_yscale("log")  # a loss that falls by 10x and more reads better on a log scale


def report(paths: Sequence[str], out: str, say: Callable[[str], None] = print) -> list[str]:
    """Plot the runs under `paths` into `out` (written atomically); returns the panel titles."""
    target = Path(out)
    fmt = FORMATS.get(target.suffix.lower())
    if fmt is None or target.is_dir():
        raise ConfigError("--out", out, f"expected a file name ending in {', '.join(FORMATS)}")
    dirs = run_dirs(paths, say)
    runs = [(label, read_metrics(d)) for label, d in zip(labels(dirs), dirs, strict=True)]
    panels = panels_for(runs)
    if not panels:
        raise DistTrainError(f"nothing to plot: no numeric metrics in {', '.join(paths)}")
    fig = draw(runs, panels)
    write_atomic(target, lambda tmp: fig.savefig(tmp, format=fmt))
    titles = [ax.get_title() for ax in fig.axes]
    say(f"wrote {target}: {len(runs)} run(s), panels: {', '.join(titles)}")
    return titles
