"""`dist-train report`: a panel per quantity with a sweep's runs overlaid, input errors, a missing
matplotlib naming the extra, and the CLI's one-line error without loading torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from dist_train.errors import ConfigError, DistTrainError

from conftest import REPO, TESTS
from helpers_sweep import write_run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


def fake_run(run_dir: Path, scale: float, tokens: bool = True) -> Path:
    records = []
    for step in range(10, 201, 10):
        loss = 5.0 * scale / step**0.5
        rate = {"samples_per_sec": 100.0, "tokens_per_sec": 6400.0 if tokens else None}
        rate |= {"mfu": 0.3} if tokens else {}
        records.append({"step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0, **rate})
        if step % 50 == 0:
            records.append(
                {"step": step, "val/loss": loss, "val/perplexity": 2.7**loss, "val/accuracy": 0.5}
            )
    return write_run(run_dir, records)


def test_report_has_a_panel_per_quantity_and_overlays_a_sweeps_runs(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    from dist_train.experiments.report import report

    sweep = tmp_path / "sweep"
    fake_run(sweep / "lr=1", 1.0)
    fake_run(sweep / "lr=2", 2.0)
    (sweep / "lr=3").mkdir()  # failed before it logged: left out, with a note
    names = [{"name": n, "overrides": []} for n in ("lr=1", "lr=2", "lr=3")]
    (sweep / "sweep.json").write_text(json.dumps({"variants": names}))
    other = fake_run(tmp_path / "other" / "lr=1", 0.5)  # same name as a sweep run
    said: list[str] = []
    out = tmp_path / "plots" / "report.png"
    titles = report([str(sweep), str(other)], str(out), said.append)
    assert titles == [
        "train loss",
        "val/loss",
        "learning rate",
        "throughput (tokens/s)",
        "MFU",
        "gradient norm",
        "val/perplexity",
        "val/accuracy",
    ]
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 1200 and image.height > 900
    assert "1 of 3 variants have no metrics yet" in said[0]
    assert said[-1].startswith(f"wrote {out}: 3 run(s)")
    assert not [p for p in out.parent.iterdir() if p.name != "report.png"]  # no temp file left
    # a run without token data: samples/s; no eval records: no eval panels
    plain = write_run(tmp_path / "plain", [{"step": 1, "loss": 1.0, "samples_per_sec": 5.0}])
    assert report([str(plain)], str(tmp_path / "p.svg"), said.append) == [
        "train loss",
        "throughput (samples/s)",
    ]


def test_report_input_errors(tmp_path: Path) -> None:
    from dist_train.experiments.report import report

    with pytest.raises(DistTrainError, match=r"no metrics.jsonl"):
        report([str(tmp_path)], str(tmp_path / "r.png"))
    with pytest.raises(ConfigError, match="no such directory"):
        report([str(tmp_path / "nope")], str(tmp_path / "r.png"))
    with pytest.raises(ConfigError, match=r"ending in \.png"):
        report([str(tmp_path)], str(tmp_path / "r.jpg"))


def test_report_without_matplotlib_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dist_train.experiments.report import report

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    run = fake_run(tmp_path / "r", 1.0)
    with pytest.raises(DistTrainError, match=r"pip install 'dist-train\[report\]'"):
        report([str(run)], str(tmp_path / "r.png"))
    assert not (tmp_path / "r.png").exists()


@pytest.mark.slow
def test_report_cli_is_one_line_and_loads_no_torch(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", 1.0)
    code = (
        "import sys\nfrom dist_train.cli.main import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    print('EXIT', e.code)\n"
        "print('TORCH', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}

    def report(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-c", code, "report", *args]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env)

    proc = report(str(run), "--out", "r.png")
    assert "EXIT 0" in proc.stdout and "TORCH False" in proc.stdout, proc.stderr
    assert (tmp_path / "r.png").is_file()
    bad = report(str(tmp_path))
    assert "EXIT 2" in bad.stdout
    assert (
        bad.stderr.strip()
        == f"error: {tmp_path}: no metrics.jsonl (not a run directory, or it never logged)"
    )


def figure_of(runs_records: dict[str, list[dict]]) -> Figure:
    from dist_train.experiments.report import draw, panels_for

    runs = list(runs_records.items())
    return draw(runs, panels_for(runs))


def panel(fig: Figure, title: str) -> Axes:
    return next(ax for ax in fig.axes if ax.get_title() == title)


def test_a_panel_of_one_point_shows_its_value_as_text(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    train = [{"step": s, "loss": 3.0 / s, "lr": 1e-3} for s in range(10, 101, 10)]
    once = [*train, {"step": 100, "val/loss": 1.23456, "val/accuracy": 0.5}]
    alone = panel(figure_of({"run": once}), "val/loss")
    assert [t.get_text() for t in alone.texts] == ["1.235 at step 100"]
    assert list(alone.get_lines()) == [] and list(alone.get_yticks()) == []  # no lone dot, no scale
    # several runs: one line each, named; a run evaluated twice is a curve, the others still text
    twice = [*train, {"step": 50, "val/loss": 2.0}, {"step": 100, "val/loss": 1.5}]
    fig = figure_of({"a": once, "b": [*train, {"step": 100, "val/loss": 0.5}], "c": twice})
    mixed = panel(fig, "val/loss")
    assert [t.get_text() for t in mixed.texts] == ["a: 1.235 at step 100", "b: 0.5 at step 100"]
    assert [len(line.get_xdata()) for line in mixed.get_lines()] == [2]
    assert list(panel(fig, "train loss").texts) == []


def test_curves_hidden_under_others_are_named_in_the_panels_legend() -> None:
    pytest.importorskip("matplotlib")

    def run(scale: float, lr: float, steps: int = 100) -> list[dict]:
        return [{"step": s, "loss": scale / s, "lr": lr * s} for s in range(10, steps + 1, 10)]

    fig = figure_of(
        {
            "a": run(1.0, 1e-3),
            "b": run(2.0, 1e-3 * (1 + 1e-6)),  # visibly the same: within a line's width
            "c": run(3.0, 1e-3, steps=50),  # shorter: on the others over its steps
            "d": run(4.0, 2e-3),
            "e": run(5.0, 2e-3),
        }
    )
    legend = panel(fig, "learning rate").get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "lr (same for a, b, c)",
        "lr (same for d, e)",
    ]
    assert panel(fig, "train loss").get_legend() is None  # distinct curves: nothing to say
    # the figure's own legend still names every run once
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["a", "b", "c", "d", "e"]


def test_the_quickstart_logs_enough_points_for_a_curve() -> None:
    from dist_train.config.load import load_config

    cfg = load_config(REPO / "configs/quickstart.yaml")
    assert cfg.train.max_steps // cfg.log.every_steps >= 50
