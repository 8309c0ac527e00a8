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
    if args.print_key:  # one value for a script (launch/slurm.sbatch: the run directory)
        print(_value(cfg, args.print_key))
        return 0
    for note in notes:
        print(f"note: {note}")
    from dist_train.launch.launcher import check_launch
    from dist_train.train.plan import build_plan, device_kind

    lc = launch_config(args)
    check_launch(lc, device_kind(cfg))
    print(to_yaml(cfg), end="")
    print(build_plan(cfg, lc.world_size, lc.nproc).format())
    return 0


def _value(cfg: object, key: str) -> object:
    from dist_train.errors import ConfigError

    value = cfg
    for part in key.split("."):
        if not hasattr(value, "__dataclass_fields__") or part not in value.__dataclass_fields__:
            raise ConfigError("--print", key, "not a config key (e.g. train.run_dir)")
        value = getattr(value, part)
    return value


def add_check_parser(sub: Any) -> None:
    check = sub.add_parser("check", help="validate; print the resolved config and the plan")
    add_run_args(check, restarts=False)
    check.add_argument(
        "--print",
        dest="print_key",
        metavar="KEY",
        default=None,
        help="print only this resolved value (e.g. train.run_dir), before torch loads",
    )
    check.set_defaults(func=cmd_check)
