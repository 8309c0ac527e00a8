"""`dist-train sweep` in process: the grid (values, product, names, errors), a sweep directory
keeping its grid, each variant's train command, and the summary's final and best figures per
metric."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dist_train.errors import ConfigError
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

from helpers_sweep import write_run

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
