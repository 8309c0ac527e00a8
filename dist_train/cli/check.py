"""`dist-train check`: validate a config, print it resolved and the plan it makes. The config is
read before torch loads, so bad input is reported quickly."""

from __future__ import annotations

import argparse
from typing import Any

from dist_train.cli.run_args import add_run_args, launch_config


def cmd_check(args: argparse.Namespace) -> int:
    from dist_train.config.load import load_config, to_yaml

    notes: list[str] = []
    cfg = load_config(args.config, args.overrides, notes)  # before torch: bad input is quick
    for note in notes:
        print(f"note: {note}")
    from dist_train.launch.launcher import check_launch
    from dist_train.train.plan import build_plan, device_kind

    lc = launch_config(args)
    check_launch(lc, device_kind(cfg))
    print(to_yaml(cfg), end="")
    print(build_plan(cfg, lc.world_size).format())
    return 0


def add_check_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="validate; print the resolved config and the plan")
    add_run_args(check, restarts=False)
    check.set_defaults(func=cmd_check)
