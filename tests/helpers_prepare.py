"""Shared by the `dist-train prepare` tests: a small corpus, prepare run in process, the token
ids it wrote, and the `tokens` loader reading them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.config.load import load_config
from dist_train.data.build import build_data
from dist_train.data.prepare import PrepareConfig, prepare_tokens

# Prose with repeats (so that a BPE learns merges), non-ASCII and a Windows line end.
DOCS = [
    f"Doc {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café, 東京.\r\n"
    * (1 + i % 3)
    for i in range(40)
]


def prep(inputs: list[Path], out: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("workers", 1)
    return prepare_tokens(PrepareConfig(tuple(map(str, inputs)), str(out), **kw), log=print)


def ids(out: Path, split: str = "train") -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"]))


def all_ids(out: Path) -> list[int]:
    val = ids(out, "val").tolist() if (out / "val.bin").exists() else []
    return ids(out).tolist() + val


def write_jsonl(path: Path, docs: list[Any], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def loaded(out: Path, *overrides: str) -> Any:
    cfg = load_config(
        None, ["data.name=tokens", f"data.path={out}", "model.block_size=8", *overrides]
    )
    return build_data(cfg)
