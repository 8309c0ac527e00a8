"""`dist-train sweep` (grid, names, summary, rerun, failures, stop and resume) and
`dist-train report` (panels, sweep directories, errors)."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from dist_train.errors import ConfigError, DistTrainError
from dist_train.experiments.grid import (
    MAX_NAME,
    parse_grid,
    pin_grid,
    split_values,
    sweep_record,
    unique_names,
    variant_name,
)
from dist_train.experiments.results import higher_is_better, read_metrics, summarize

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


def write_run(run_dir: Path, records: list[dict]) -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


# --- the grid ---------------------------------------------------------------------------------


def test_values_split_on_commas_outside_brackets_and_quotes() -> None:
    assert split_values("1e-3,3e-4") == ["1e-3", "3e-4"]
    assert split_values("[64,64],[128]") == ["[64,64]", "[128]"]
    assert split_values("'a,b',c") == ["'a,b'", "c"]
    assert split_values("0.1") == ["0.1"]


def test_grid_is_the_product_in_the_order_given_with_readable_names() -> None:
    grid = parse_grid(["optim.lr=1e-3,3e-4", "train.max_steps=5", "model.n_layer=2,4"])
    assert grid.fixed == ("train.max_steps=5",)
    variants = grid.variants()
    assert [v.name for v in variants] == [
        "lr=1e-3,n_layer=2",
        "lr=1e-3,n_layer=4",
        "lr=3e-4,n_layer=2",
        "lr=3e-4,n_layer=4",
    ]
    assert variants[1].overrides == ("optim.lr=1e-3", "model.n_layer=4")
    # nothing varies: one run; a run dir with commas is the sweep dir, never an axis
    only = parse_grid(["train.run_dir=runs/a,b", "optim.lr=0.1"])
    assert only.fixed == ("train.run_dir=runs/a,b", "optim.lr=0.1")
    assert [v.name for v in only.variants()] == ["run"]


def test_names_are_file_system_safe_unique_and_short() -> None:
    assert variant_name(["model.x", "data.x"], ["1", "2"]) == "model.x=1,data.x=2"
    assert variant_name(["model.hidden_dims"], ["[64, 64]"]) == "hidden_dims=64_64"
    assert variant_name(["train.sample_prompt"], ["'a b'"]) == "sample_prompt=ab"
    grid = parse_grid(["data.path=a/b,a:b,a?b"])
    assert [v.name for v in grid.variants()] == ["path=a_b", "path=a_b-2", "path=a_b-3"]
    long = variant_name(["train.sample_prompt"], ["x" * 300])
    assert len(long) == MAX_NAME and long != variant_name(["train.sample_prompt"], ["x" * 299])
    assert unique_names(["a", "a", "b"]) == ["a", "a-2", "b"]


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["optim.lr=0.1,0.2", "optim.lr=0.3"], "given twice"),
        (["optim.lr=0.1,0.1"], "distinct, non-empty"),
        (["optim.lr=0.1,"], "distinct, non-empty"),
    ],
)
def test_grid_errors_name_the_key(words: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as e:
        parse_grid(words)
    assert e.value.key == "optim.lr"


def test_a_sweep_dir_keeps_its_grid(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    said: list[str] = []

    def pin(words: list[str]) -> None:
        pin_grid(tmp_path, sweep_record(config, parse_grid(words)), "--dir", said.append)

    pin(["optim.lr=0.1,0.2"])
    pin(["optim.lr=0.1,0.2"])  # the same sweep: continues
    assert said == []
    with pytest.raises(ConfigError, match="holds another sweep: axes") as e:
        pin(["optim.lr=0.1,0.3"])
    assert e.value.key == "--dir"
    config.write_text("train: {max_steps: 5}\n")  # edited since: said, not refused
    pin(["optim.lr=0.1,0.2"])
    assert said == [
        f"note: {config} has changed since this sweep started; the variants done already are "
        "not trained again"
    ]


def test_each_variant_is_this_checkouts_train_with_its_own_run_dir() -> None:
    from dist_train.experiments.sweep import SweepArgs, train_command

    grid = parse_grid(["optim.lr=0.1,0.2", "train.max_steps=5"])
    args = SweepArgs("cfg.yaml", [], None, nproc=2)
    cmd = train_command(args, grid, grid.variants()[1], Path("sw/lr=0.2"))
    assert cmd == [
        sys.executable,
        "-m",
        "dist_train",
        "train",
        "cfg.yaml",
        "train.max_steps=5",
        "optim.lr=0.2",
        "train.run_dir=sw/lr=0.2",
        "--nproc",
        "2",
    ]
    assert "--nproc" not in train_command(
        SweepArgs("cfg.yaml", []), grid, grid.variants()[0], Path("x")
    )


def test_a_run_directory_is_no_sweep_directory(tmp_path: Path) -> None:
    from dist_train.experiments.sweep import SweepArgs, run_sweep

    (tmp_path / "config.yaml").write_text("{}\n")  # an earlier run's
    with pytest.raises(ConfigError, match=r"holds a training run .*--dir") as e:
        run_sweep(SweepArgs("configs/mlp_synthetic.yaml", ["optim.lr=0.1,0.2"], str(tmp_path)))
    assert e.value.key == "--dir"
    with pytest.raises(ConfigError, match="must be >= 1"):
        run_sweep(SweepArgs("configs/mlp_synthetic.yaml", ["optim.lr=0.1,0.2"], None, nproc=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# --- results ----------------------------------------------------------------------------------


def test_final_and_best_per_metric_min_for_losses_max_for_accuracy_like(tmp_path: Path) -> None:
    run = write_run(
        tmp_path / "r",
        [
            {"step": 1, "loss": 3.0, "lr": 0.1},
            {"step": 2, "val_loss": 2.0},  # legacy key: read as val/loss
            {"step": 3, "loss": 2.5, "lr": 0.1},
            {"step": 4, "val/loss": 2.2, "val/accuracy": 0.7, "val/f1": 0.4, "val/perplexity": 9.0},
            {
                "step": 6,
                "val/loss": 2.4,
                "val/accuracy": 0.6,
                "val/f1": 0.5,
                "val/perplexity": 11.0,
            },
        ],
    )
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss"')  # a line cut short by a kill: skipped
    records = read_metrics(run)
    metrics = ["val/loss", "val/accuracy", "val/f1", "val/perplexity"]
    row = summarize(records, metrics)
    assert row["steps"] == 3 and row["loss"] == 2.5
    assert (row["val/loss"], row["best val/loss"]) == (2.4, 2.0)
    assert (row["val/accuracy"], row["best val/accuracy"]) == (0.6, 0.7)
    assert (row["val/f1"], row["best val/f1"]) == (0.5, 0.5)
    assert (row["val/perplexity"], row["best val/perplexity"]) == (11.0, 9.0)
    assert higher_is_better("val/top5_acc") and not higher_is_better("val/error_rate")


# --- report -----------------------------------------------------------------------------------


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


# --- sweeps, end to end -----------------------------------------------------------------------


@pytest.mark.slow
def test_2x2_sweep_summary_rerun_skips_and_report(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    args = [*TINY_MLP, *SHORT, "optim.lr=0.05,0.01", "model.hidden_dims=[8],[16]"]
    proc = cli("sweep", *args, "--dir", str(sweep))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
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
    assert proc.stdout.strip().splitlines()[-1].startswith("sweep: 4 done (of 4 variants)")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("0.0")]
    assert len(lines) == 4 and all(" done " in line for line in lines)  # the printed table

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
