"""`dist-train export`: consolidate a (sharded) checkpoint into one .safetensors file. Torch
loads only when the command runs, so `dist-train --help` stays light."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.export import export

    path = export(args.source, args.out, args.dtype, print)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {args.dtype})")
    return 0


def add_export_parser(sub: Any) -> None:
    export = sub.add_parser("export", help="consolidate a sharded checkpoint into .safetensors")
    export.add_argument("source", help="a run directory or one checkpoints/step_N folder")
    export.add_argument("--out", required=True, help="output file, e.g. model.safetensors")
    export.add_argument(
        "--dtype",
        default="fp32",
        help="floating tensors as fp32 (default, as trained), bf16 or fp16",
    )
    export.set_defaults(func=cmd_export, overrides=[])
