"""`dist-train export`: consolidate a (sharded) checkpoint into one .safetensors file, or a
`save_pretrained` folder with `--format hf`. Torch loads only when the command runs, so
`dist-train --help` stays light."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_export(args: argparse.Namespace) -> int:
    from dist_train.checkpoint.export import export

    path = export(args.source, args.out, args.dtype, print, args.format)
    files = sorted(path.iterdir()) if path.is_dir() else [path]
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {path} ({size / 1e6:.1f} MB, {args.dtype}, {args.format})")
    return 0


def add_export_parser(sub: Any) -> None:
    export = sub.add_parser("export", help="consolidate a sharded checkpoint into .safetensors")
    export.add_argument("source", help="a run directory or one checkpoints/step_N folder")
    export.add_argument(
        "--out",
        required=True,
        help="output file, e.g. model.safetensors (--format hf: a folder, e.g. model-hf)",
    )
    export.add_argument(
        "--format",
        default="safetensors",
        choices=("safetensors", "hf"),
        help="safetensors (default): one file with the run in its metadata; hf: a folder "
        "transformers' from_pretrained loads (transformers models and the built-in gpt)",
    )
    export.add_argument(
        "--dtype",
        default="fp32",
        help="floating tensors as fp32 (default, as trained), bf16 or fp16",
    )
    export.set_defaults(func=cmd_export, overrides=[])
