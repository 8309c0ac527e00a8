"""What an exported .safetensors file says about itself: the model config, the data it was
trained on and its tokenizer, the step. safetensors metadata is str -> str, so values are JSON."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_train.data.tokens import read_meta_pkl
from dist_train.errors import ConfigError

# The keys an export writes (README, "Export for serving").
MODEL_KEY = "dist_train.model"
DATA_KEY = "dist_train.data"
TOKENIZER_KEY = "dist_train.tokenizer"
STEP_KEY = "dist_train.step"
VERSION_KEY = "dist_train.version"


def serving_metadata(manifest: dict[str, Any], say: Callable[[str], None]) -> dict[str, str]:
    """Metadata from a checkpoint's manifest (which holds the run's resolved config)."""
    config = manifest["config"]
    data = config["data"]
    metadata = {
        "format": "pt",  # what transformers and safetensors' own save_model write
        MODEL_KEY: json.dumps(config["model"], sort_keys=True),
        DATA_KEY: json.dumps({k: data.get(k) for k in ("name", "path", "_target_")}),
        STEP_KEY: str(manifest["step"]),
        VERSION_KEY: str(manifest.get("versions", {}).get("dist_train", "")),
    }
    tokenizer = tokenizer_record(data, say)
    if tokenizer is not None:
        metadata[TOKENIZER_KEY] = json.dumps(tokenizer, sort_keys=True)
    return metadata


def tokenizer_record(data: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any] | None:
    """The tokenizer of a `data.name=tokens` folder: the `tokenizer` entry of its meta.json
    (dist_train's prepared format) with the top level's `vocab_size`, else what nanoGPT's
    meta.pkl holds (vocab_size; its itos alphabet as a char tokenizer). None for other data."""
    if data.get("name") != "tokens" or data.get("_target_") or not data.get("path"):
        return None
    root = Path(data["path"])  # as the run was given it: relative to where export runs
    if (root / "meta.json").is_file():
        meta = _read_json(root / "meta.json")
        if isinstance(meta.get("tokenizer"), dict):
            return {"vocab_size": meta.get("vocab_size"), **meta["tokenizer"]}
        say(f"note: no tokenizer recorded: {root / 'meta.json'} has no `tokenizer` entry")
        return None
    pkl = read_meta_pkl(root)
    if not pkl:
        say(f"note: no tokenizer recorded: {root} holds no meta.json or meta.pkl")
        return None
    record: dict[str, Any] = {"vocab_size": pkl.get("vocab_size", len(pkl.get("itos", {})))}
    if "itos" in pkl:
        itos = pkl["itos"]
        record.update(type="char", chars="".join(itos[i] for i in sorted(itos)))
    return record


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("data.path", str(path), f"unreadable meta.json ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("data.path", str(path), "meta.json is not a JSON object")
    return value
