"""The `tokens` dataset: a folder of train.bin/val.bin token ids, described by the meta.json of
`dist-train prepare` (uint16 or uint32, with its tokenizer) or by nanoGPT's meta.pkl (uint16)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.config.schema import RunConfig
from dist_train.data.datasets import Data, DataSpec, block_size, split_windows
from dist_train.data.outdir import FORMAT, META, STAGING, VERSION
from dist_train.data.tokenizer import codec_from_meta
from dist_train.errors import ConfigError

KEY = "data.path"


@dataclass
class TokenMeta:
    """What a folder says about its tokens; all optional, as for nanoGPT's own files."""

    dtype: np.dtype = field(default_factory=lambda: np.dtype("<u2"))
    vocab_size: int = 0  # 0: unknown (the largest id + 1)
    source: str = ""  # the file vocab_size comes from, for messages
    counts: dict[str, int] = field(default_factory=dict)  # tokens per file, when recorded
    encode: Callable[[str], list[int]] | None = None
    decode: Callable[[list[int]], str] | None = None


def token_data(cfg: RunConfig) -> Data:
    root = Path(cfg.data.path or "")
    if not cfg.data.path or not (root / "train.bin").is_file():
        raise ConfigError(
            KEY,
            cfg.data.path,
            "expected a directory holding train.bin (and val.bin, meta.json or meta.pkl), as "
            "`dist-train prepare` or nanoGPT's prepare.py write them",
        )
    if (root / META).is_file():
        meta = _meta_json(root)
    elif (root / "meta.pkl").is_file():
        meta = _meta_pkl(root)
    elif any(root.glob(f"{STAGING}*")):  # train.bin without its meta.json: mid-replacement
        raise ConfigError(
            KEY, cfg.data.path, "a dist-train prepare is writing here or was killed; run it again"
        )
    else:
        meta = TokenMeta()
    train = _token_file(root / "train.bin", meta)
    val = _token_file(root / "val.bin", meta) if (root / "val.bin").is_file() else None
    if val is None and meta.counts.get("val"):
        raise ConfigError(KEY, str(root / "val.bin"), f"missing; {META} records its tokens")
    vocab_size = _check_range(cfg, [t for t in (train, val) if t is not None], meta)
    spec = DataSpec(
        "lm",
        vocab_size=vocab_size,
        tokens_per_sample=block_size(cfg),
        encode=meta.encode,
        decode=meta.decode,
    )
    return split_windows(cfg, train, val, spec, KEY)


def _check_range(cfg: RunConfig, arrays: list[np.ndarray], meta: TokenMeta) -> int:
    """The largest id decides the embedding a model needs: checked here, not at the first
    forward pass inside the workers (one pass over the memory-mapped tokens)."""
    top = max(int(t.max()) for t in arrays if len(t))
    vocab_size = cfg.data.vocab_size or meta.vocab_size or top + 1
    if top < vocab_size:
        return vocab_size
    if cfg.data.vocab_size:
        key, value, source = "data.vocab_size", cfg.data.vocab_size, "data.vocab_size"
    else:
        key, value, source = KEY, cfg.data.path, f"the vocab_size of {meta.source}"
    raise ConfigError(
        key,
        value,
        f"the tokens hold id {top}, so the vocabulary needs at least {top + 1} entries, not "
        f"{vocab_size} ({source}); set data.vocab_size={top + 1} or more, or prepare the data "
        "again with the tokenizer the model uses",
    )


def _meta_json(root: Path) -> TokenMeta:
    path = root / META
    try:
        meta = _json_object(path)
    except (OSError, ValueError) as e:
        raise ConfigError(KEY, str(path), f"not readable JSON ({e})") from None
    if meta.get("format") != FORMAT or not isinstance(meta.get("version"), int):
        raise ConfigError(KEY, str(path), f"not a {FORMAT} meta.json (no format/version)")
    if meta["version"] > VERSION:
        raise ConfigError(
            KEY,
            str(path),
            f"format version {meta['version']}: written by a newer dist_train, this one reads "
            f"version {VERSION}; upgrade dist_train",
        )
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ConfigError(KEY, str(path), f"dtype {meta.get('dtype')!r}: expected uint16 or uint32")
    codec = codec_from_meta(meta.get("tokenizer"), root, KEY)
    counts = {s: meta[f"{s}_tokens"] for s in ("train", "val") if f"{s}_tokens" in meta}
    return TokenMeta(
        dtype=np.dtype(meta["dtype"]).newbyteorder("<"),
        vocab_size=int(meta.get("vocab_size") or 0),
        source=str(path),
        counts=counts,
        encode=codec.encode,
        decode=codec.decode,
    )


def _json_object(path: Path) -> dict[str, Any]:
    meta = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(meta, dict):
        raise ValueError(f"a JSON {type(meta).__name__}, not an object")
    return meta


def read_meta_pkl(root: Path) -> dict[str, Any]:
    """nanoGPT's optional meta.pkl in a token folder (vocab_size; itos/stoi for its char
    datasets), or {} when there is none."""
    path = root / "meta.pkl"
    if not path.is_file():
        return {}
    try:
        with open(path, "rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]  # the user's own file
    except Exception as e:
        raise ConfigError(
            KEY, str(path), f"not a readable pickle ({type(e).__name__}: {e})"
        ) from None


def _meta_pkl(root: Path) -> TokenMeta:
    meta = read_meta_pkl(root)
    result = TokenMeta(vocab_size=int(meta.get("vocab_size", 0)), source=str(root / "meta.pkl"))
    if "itos" in meta:
        itos = meta["itos"]
        result.decode = lambda ids: "".join(itos[i] for i in ids)
    if "stoi" in meta:
        stoi = meta["stoi"]
        result.encode = lambda s: [stoi[c] for c in s if c in stoi]
    return result


def _token_file(path: Path, meta: TokenMeta) -> np.ndarray:
    size, width = path.stat().st_size, meta.dtype.itemsize
    if size == 0 or size % width:
        raise ConfigError(
            KEY,
            str(path),
            f"{size} bytes: expected a non-empty file of {meta.dtype.name} token ids (a "
            f"multiple of {width} bytes)",
        )
    expected = meta.counts.get(path.stem)
    if expected is not None and expected != size // width:
        raise ConfigError(
            KEY,
            str(path),
            f"holds {size // width} tokens but {META} records {expected} (an incomplete "
            "copy?); copy it again or prepare the data again",
        )
    return np.memmap(path, dtype=meta.dtype, mode="r")
