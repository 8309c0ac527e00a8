"""`dist-train sample RUN_DIR`: text from a trained language model. Torch loads only when the
command runs, so `dist-train --help` stays light."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dist_train.errors import ConfigError


def cmd_sample(args: argparse.Namespace) -> int:
    from dist_train.train.sampling import load_for_sampling, sample_text

    if args.tokens < 1:
        raise ConfigError("--tokens", args.tokens, "must be >= 1")
    if args.temperature <= 0:
        raise ConfigError("--temperature", args.temperature, "must be > 0")
    if args.top_k < 0:
        raise ConfigError("--top-k", args.top_k, "must be >= 0 (0: no top-k cut)")
    run_dir = Path(args.run_dir)
    model, spec, path = load_for_sampling(run_dir, args.checkpoint, args.device)
    device = next(model.parameters()).device
    sampled = sample_text(
        model,
        spec,
        args.prompt,
        args.tokens,
        seed=args.seed,
        device=device,
        temperature=args.temperature,
        top_k=args.top_k or None,
    )
    if sampled is None:
        raise ConfigError(
            "run_dir",
            str(run_dir),
            "its model cannot sample (no sample_tokens, not a causal LM) or its data has no "
            "tokenizer to decode with",
        )
    text, tokens = sampled
    print(f"{tokens} tokens from {path}", file=sys.stderr)
    print(text)
    return 0


def add_sample_parser(sub: Any) -> None:
    p = sub.add_parser("sample", help="text from a trained language model's checkpoint")
    p.add_argument("run_dir", help="a run directory (its config.yaml and checkpoints)")
    p.add_argument("--prompt", default="\n", help="text to continue (default: a newline)")
    p.add_argument("--tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="(default 0.8)")
    p.add_argument("--top-k", type=int, default=20, help="sample among the k likeliest (20)")
    p.add_argument("--seed", type=int, default=0, help="the same seed gives the same text")
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="latest (default), best (checkpoint.best's), or a checkpoint folder",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.set_defaults(func=cmd_sample, overrides=[])
