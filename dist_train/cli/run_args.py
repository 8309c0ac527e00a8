"""The arguments `train` and `check` share (config, overrides, the launch topology) and the
LaunchConfig they make. Torch-free: `dist-train --help` builds these parsers."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dist_train.launch.launcher import LaunchConfig


def launch_config(args: argparse.Namespace, timeout_s: int = 30) -> LaunchConfig:
    from dist_train.launch.launcher import LaunchConfig

    nproc = 1 if args.nproc is None else args.nproc  # an explicit 0 is an error, not "default"
    return LaunchConfig(
        nproc=nproc,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
        rdzv_id=args.rdzv_id,
        rdzv_timeout_s=args.rdzv_timeout,
        max_restarts=getattr(args, "max_restarts", 0),
        # After a stop signal the agent waits this long for the workers' checkpoint before it
        # kills them; healthy workers exit as soon as it is written.
        shutdown_timeout_s=max(30, timeout_s),
    )


def add_run_args(p: argparse.ArgumentParser, *, restarts: bool) -> None:
    p.add_argument("config", help="YAML experiment file, or a shipped config's name (quickstart)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4")
    p.add_argument("--nproc", type=int, default=None, help="workers on this node (default 1)")
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        help="nodes taking part; the same command runs on each (default 1)",
    )
    p.add_argument(
        "--node-rank", type=int, default=0, help="this node's index, 0..nnodes-1 (default 0)"
    )
    p.add_argument("--rdzv-endpoint", default=None, help="host:port of the rendezvous (multi-node)")
    p.add_argument("--rdzv-id", default="dist_train", help="same on every node of one job")
    p.add_argument(
        "--rdzv-timeout",
        type=int,
        default=600,
        help="seconds the nodes wait for each other at the start (default 600)",
    )
    if restarts:
        p.add_argument(
            "--max-restarts",
            type=int,
            default=0,
            help="restart the worker group this many times after a failure",
        )
