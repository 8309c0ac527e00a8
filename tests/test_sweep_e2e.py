"""`dist-train sweep` end to end through the real CLI: a 2x2 grid's summary, a rerun that skips
what is done, another grid refused, the report of the sweep; failing variants recorded while the
sweep goes on; a stopped sweep recorded as interrupted and resumed by a rerun."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
from pathlib import Path

import pytest

from dist_train.experiments.results import read_metrics

from conftest import CLI, REPO, TESTS, cli, wait_for_metrics

# The synthetic MLP, small: a variant trains in well under a second after start-up.
TINY_MLP = [
    "configs/mlp_synthetic.yaml",
    "train.device=cpu",
    "log.progress=never",
    "data.num_samples=512",
]
SHORT = ["train.max_steps=6", "log.every_steps=2", "train.eval_every=3"]
NARROW = "model.hidden_dims=[16]"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def check_2x2_summary(sweep: Path, stdout: str) -> None:
    """The 2x2 sweep's summary.csv (rows, columns, figures from each run's metrics, logs) and
    the table it printed."""
    rows = read_csv(sweep / "summary.csv")
    assert [(r["optim.lr"], r["model.hidden_dims"]) for r in rows] == [
        ("0.05", "[8]"),
        ("0.05", "[16]"),
        ("0.01", "[8]"),
        ("0.01", "[16]"),
    ]
    assert list(rows[0])[:8] == [
        "name",
        "optim.lr",
        "model.hidden_dims",
        "status",
        "steps",
        "loss",
        "val/loss",
        "best val/loss",
    ]
    assert {r["status"] for r in rows} == {"done"} and {r["steps"] for r in rows} == {"6"}
    for row in rows:
        run = sweep / row["name"]
        val = [r["val/loss"] for r in read_metrics(run) if "val/loss" in r]
        assert float(row["val/loss"]) == pytest.approx(val[-1])
        assert float(row["best val/loss"]) == pytest.approx(min(val))
        assert float(row["wall_sec"]) > 0 and (sweep / "logs" / f"{row['name']}.log").is_file()
    assert stdout.strip().splitlines()[-1].startswith("sweep: 4 done (of 4 variants)")
    lines = [line for line in stdout.splitlines() if line.startswith("0.0")]
    assert len(lines) == 4 and all(" done " in line for line in lines)  # the printed table


@pytest.mark.slow
def test_2x2_sweep_summary_rerun_skips_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY_MLP, *SHORT, "optim.lr=0.05,0.01", "model.hidden_dims=[8],[16]"]
    proc = cli("sweep", *args, "--dir", str(sweep))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    check_2x2_summary(sweep, proc.stdout)

    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*") if p.is_file()}
    again = cli("sweep", *args, "--dir", str(sweep))
    assert again.returncode == 0, again.stderr
    assert "(4 done already, 0 to run)" in again.stdout
    assert (
        again.stdout.count("done already, skipped") == 4 and "dist-train train" not in again.stdout
    )
    changed = {p.name for p, t in before.items() if p.stat().st_mtime_ns != t}
    assert changed <= {"summary.csv"}  # no run was touched

    other = cli("sweep", *TINY_MLP, *SHORT, "optim.lr=0.05,0.02", "--dir", str(sweep))
    assert other.returncode == 2 and "holds another sweep" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1

    report = cli("report", str(sweep), "--out", str(tmp_path / "r.png"))
    assert report.returncode == 0, report.stderr
    assert "4 run(s), panels: train loss, val/loss, learning rate" in report.stdout
    assert (tmp_path / "r.png").stat().st_size > 10_000


@pytest.mark.slow
def test_failing_variants_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    # micro batch 32: 63 does not split (found by the variant's own process); 0 is invalid
    # before any process starts
    sweep = tmp_path / "sweep"
    gbs = "train.global_batch_size=64,63,0"
    proc = cli("sweep", *TINY_MLP, *SHORT, NARROW, gbs, "--dir", str(sweep))
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr
    rows = {r["train.global_batch_size"]: r for r in read_csv(sweep / "summary.csv")}
    assert rows["64"]["status"] == "done" and rows["64"]["exit_code"] == "0"
    assert rows["63"]["status"] == "failed" and rows["63"]["exit_code"] == "2"
    assert rows["63"]["message"].startswith("train.global_batch_size=63: must be divisible")
    assert rows["0"]["status"] == "failed"
    assert rows["0"]["message"] == "train.global_batch_size=0: must be > 0"
    assert not (sweep / "logs" / "global_batch_size=0.log").exists()  # never started
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("sweep: 1 done, 2 failed (of 3 variants)") and "exit status 1" in last
    # a grid in which nothing can run is the sweep's own one-line error, before anything exists
    none = cli("sweep", *TINY_MLP, "optim.lrr=1,2", "--dir", str(tmp_path / "none"))
    assert none.returncode == 2 and none.stderr.startswith("error: optim.lrr='1': unknown key")
    assert not (tmp_path / "none").exists()


# Each step reads 8 items of 5 ms: 40 steps last about 2 s on any machine, however loaded.
SLOW_RUN = """
model: {_target_: user_plugins.TinyRegressor, kwargs: {in_features: 8}}
data: {_target_: user_plugins.SlowLines, kwargs: {seconds: 0.005}}
train: {device: cpu, max_steps: 40, global_batch_size: 8}
log: {every_steps: 2, progress: never}
checkpoint: {every_steps: 4}
"""


@pytest.mark.slow
def test_stopped_sweep_records_interrupted_and_a_rerun_resumes_it(tmp_path: Path) -> None:
    config, sweep = tmp_path / "slow.yaml", tmp_path / "sweep"
    config.write_text(SLOW_RUN)
    args = ["sweep", str(config), "optim.lr=0.01,0.02", "--dir", str(sweep)]
    env = {**os.environ, "PYTHONPATH": f"{TESTS}{os.pathsep}{REPO}"}
    proc = subprocess.Popen([str(CLI), *args], env=env, stdout=subprocess.PIPE, text=True)
    wait_for_metrics(sweep / "lr=0.01", proc)
    proc.send_signal(signal.SIGTERM)  # to the sweep: it passes it on to the running variant
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out[-3000:]
    rows = read_csv(sweep / "summary.csv")
    assert [r["status"] for r in rows] == ["interrupted", "pending"]
    saved = sorted((sweep / "lr=0.01" / "checkpoints").glob("step_*"))
    stopped_at = int(saved[-1].name.removeprefix("step_"))
    assert 0 < stopped_at < 40 and rows[0]["steps"] == str(stopped_at)
    assert rows[0]["message"].startswith(f"preempted (SIGTERM) at step {stopped_at}: saved")
    last = out.strip().splitlines()[-1]
    assert last.startswith("sweep: stopped by SIGTERM: 1 interrupted, 1 pending; run the same")

    again = cli(*args)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr
    assert f"[1] resumed from {saved[-1]} at step {stopped_at}" in again.stdout
    rows = read_csv(sweep / "summary.csv")
    assert [(r["status"], r["steps"]) for r in rows] == [("done", "40"), ("done", "40")]
    steps = [r["step"] for r in read_metrics(sweep / "lr=0.01") if "loss" in r]
    assert steps == list(range(2, 41, 2))  # one lineage: stopped, resumed, nothing repeated
