"""`dist-train bench` statistics (quantiles, paired ratios, interleaved order and timing) and
its report: the strict JSON with every raw figure, and the table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dist_train.bench.harness import BenchArgs, measure_interleaved
from dist_train.bench.report import BenchReport, Column, format_table, timing_rows, write_json
from dist_train.bench.stats import (
    interleaved_order,
    median,
    paired_ratios,
    quantile,
    ratio_summary,
    round_medians,
    summarize,
)

from helpers_bench import CPU1

# --- statistics -------------------------------------------------------------------------------


def test_quantiles_interpolate_like_numpy() -> None:
    xs = [7.0, 1.0, 3.0, 5.0]
    assert median(xs) == 4.0
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert quantile(xs, 0.0) == 1.0 and quantile(xs, 1.0) == 7.0
    assert quantile(xs, 0.25) == pytest.approx(2.5)  # numpy.percentile(xs, 25)
    assert quantile([4.0], 0.75) == 4.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_summary_is_robust_to_one_outlier() -> None:
    s = summarize([1.0, 1.0, 1.1, 0.9, 100.0])
    assert s["median"] == 1.0 and s["min"] == 0.9 and s["max"] == 100.0 and s["n"] == 5
    assert s["iqr"] == pytest.approx(s["q3"] - s["q1"]) and s["iqr"] == pytest.approx(0.1)
    assert s["mean"] > 20  # the mean moves, the median does not


def test_round_figure_is_the_median_of_its_steps() -> None:
    assert round_medians([[1.0, 9.0, 2.0], [3.0, 3.0]]) == [2.0, 3.0]


def test_ratios_are_paired_per_round() -> None:
    a, b = [2.0, 4.0, 9.0], [1.0, 2.0, 3.0]
    assert paired_ratios(a, b) == [2.0, 2.0, 3.0]
    r = ratio_summary(a, b)
    assert r["median"] == 2.0 and r["per_round"] == [2.0, 2.0, 3.0]
    assert r["ratio_of_medians"] == 2.0 and r["min"] == 2.0 and r["max"] == 3.0
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_order_rotates_so_no_contender_always_goes_first() -> None:
    assert interleaved_order(["a", "b"], 4) == [["a", "b"], ["b", "a"], ["a", "b"], ["b", "a"]]
    rounds = interleaved_order(["a", "b", "c"], 6)
    for position in range(3):
        firsts = [r[position] for r in rounds]
        assert sorted(firsts) == ["a", "a", "b", "b", "c", "c"]


def test_measure_interleaved_warms_up_then_alternates() -> None:
    calls: list[tuple[str, int]] = []
    runners = {name: (lambda n, name=name: calls.append((name, n))) for name in ("a", "b")}
    args = BenchArgs("t", None, steps=3, warmup=2, repeats=3)
    times = measure_interleaved(runners, args, CPU1)
    # On CPU every step is timed on its own: a list of `steps` times per round.
    assert calls[:2] == [("a", 2), ("b", 2)] and len(calls) == 2 + 3 * 2 * 3
    assert all(n == 1 for _, n in calls[2:])
    assert [name for name, _ in calls[2::3]] == ["a", "b", "b", "a", "a", "b"]
    assert {k: [len(r) for r in v] for k, v in times.items()} == {"a": [3] * 3, "b": [3] * 3}
    assert all(t >= 0 for v in times.values() for r in v for t in r)


# --- report and JSON -------------------------------------------------------------------------


def _report() -> BenchReport:
    # Two steps per round; a round's figure is the median of its steps.
    times = {
        "x": [[0.010, 0.010], [0.011, 0.013], [0.011, 0.011]],
        "y": [[0.010, 0.010], [0.009, 0.011], [0.010, 0.010]],
    }
    rows = timing_rows(times, {"x": 16, "y": 16}, tokens_per_sample=64)
    return BenchReport(
        "demo",
        {"nan": float("nan"), "nested": {"inf": float("inf")}},
        rows,
        [Column("step_time_s.median", "step ms", 1e3, ".2f")],
        ratios={"x/y": ratio_summary(round_medians(times["x"]), round_medians(times["y"]))},
        notes=["a note"],
    )


def test_json_holds_every_raw_figure_and_is_strict(tmp_path: Path) -> None:
    path = write_json(_report(), tmp_path / "sub" / "demo.json")
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON: non-finite -> null
    data = json.loads(text)
    assert data["benchmark"] == "demo" and data["notes"] == ["a note"]
    assert data["settings"] == {"nan": None, "nested": {"inf": None}}
    x = data["results"][0]
    assert x["step_times_s"] == [[0.010, 0.010], [0.011, 0.013], [0.011, 0.011]]
    assert x["step_time_s_per_round"] == pytest.approx([0.010, 0.012, 0.011])
    assert x["step_time_s"]["median"] == pytest.approx(0.011)
    assert x["samples_per_sec"]["median"] == pytest.approx(16 / 0.011)
    assert x["tokens_per_sec"]["median"] == pytest.approx(64 * 16 / 0.011)
    assert data["ratios"]["x/y"]["per_round"] == pytest.approx([1.0, 1.2, 1.1])


def test_table_shows_contenders_and_ratios() -> None:
    table = format_table(_report())
    assert "bench demo" in table and "11.00" in table and "x/y: 1.100" in table
    assert table.splitlines()[-1] == "a note"
