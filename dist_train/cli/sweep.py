"""`dist-train sweep` and `dist-train report`: their arguments. The work loads only when a
command runs, so `dist-train --help` stays light."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_sweep(args: argparse.Namespace) -> int:
    from dist_train.experiments.sweep import SweepArgs, run_sweep

    return run_sweep(SweepArgs(args.config, args.overrides, args.dir, args.nproc))


def cmd_report(args: argparse.Namespace) -> int:
    from dist_train.experiments.report import report

    report([*args.runs, *args.overrides], args.out)  # words with "=" after an option
    return 0


def add_sweep_report_parsers(sub: Any) -> None:
    sweep = sub.add_parser(
        "sweep", help="train a grid of overrides (key=a,b,c), one run after another; summary"
    )
    sweep.add_argument("config", help="YAML experiment file, or a shipped config's name")
    sweep.add_argument(
        "overrides", nargs="*", help="key=value for every run, key=a,b,c to sweep (the grid)"
    )
    sweep.add_argument("--nproc", type=int, default=None, help="workers per run (default 1)")
    sweep.add_argument(
        "--dir", default=None, help="sweep directory (default: the config's train.run_dir)"
    )
    sweep.set_defaults(func=cmd_sweep)
    report = sub.add_parser("report", help="plot runs' metrics into one image (matplotlib)")
    report.add_argument("runs", nargs="+", help="run directories and/or sweep directories")
    report.add_argument("--out", default="report.png", help="image file (default report.png)")
    report.set_defaults(func=cmd_report, overrides=[])
