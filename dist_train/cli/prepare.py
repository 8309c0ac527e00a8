"""What a user of `dist-train prepare` sees: its arguments, the progress display and the closing
line. The work (and numpy) loads only when the command runs, so `dist-train --help` stays light."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dist_train.errors import DistTrainError


def cmd_prepare(args: argparse.Namespace) -> int:
    from dist_train.data.prepare import PrepareConfig, prepare_tokens

    if args.overrides:  # key=value words mean nothing here: refuse rather than drop them
        raise DistTrainError(f"unrecognized arguments: {' '.join(args.overrides)}")
    cfg = PrepareConfig(
        inputs=tuple(args.inputs),
        out=args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        field=args.field,
        val_fraction=args.val_fraction,
        val_inputs=tuple(args.val or ()),
        workers=args.workers,
    )
    print(summary(prepare_tokens(cfg), args.out))
    return 0


def add_prepare_parser(sub: Any) -> None:
    p = sub.add_parser("prepare", help="tokenize text/JSONL/Parquet into train.bin/val.bin")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or glob patterns")
    p.add_argument("--out", required=True, help="output folder (new, empty, or prepared before)")
    p.add_argument(
        "--tokenizer",
        default="char",
        help="char (default), bytes, bpe (learned from the input), or a tokenizer.json",
    )
    p.add_argument(
        "--vocab-size", type=int, default=0, help="bpe: the vocabulary to learn (257 to 1048576)"
    )
    p.add_argument("--field", default="text", help="JSONL field or column (default: text)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        help="the tail of the tokens kept for validation (default 0.1)",
    )
    p.add_argument(
        "--val",
        action="append",
        metavar="INPUT",
        help="a validation input instead of a tail (repeat the flag for more)",
    )
    p.add_argument("--workers", type=int, default=0, help="encoding processes (default: all cores)")
    p.set_defaults(func=cmd_prepare, overrides=[])


def summary(meta: dict[str, Any], out: str) -> str:
    """The line `dist-train prepare` ends with."""
    val = f"val.bin ({meta['val_tokens']:,} tokens)" if meta["val_tokens"] else "no val.bin"
    return (
        f"wrote {Path(out) / 'train.bin'} ({meta['train_tokens']:,} tokens), {val}, meta.json: "
        f"{meta['dtype']}, vocabulary {meta['vocab_size']:,} ({meta['tokenizer']['type']}), "
        f"{meta.get('seconds', 0):.1f} s; train with data.name=tokens data.path={out}"
    )
