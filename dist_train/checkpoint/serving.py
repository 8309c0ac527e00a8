"""What an export says about itself: the model config, the data it was trained on and its
tokenizer (always: a record, or one saying why there is none), the step. safetensors metadata is
str -> str, so values are JSON."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dist_train.data.build import char_alphabet, default_corpus
from dist_train.data.tokens import read_meta_pkl
from dist_train.errors import ConfigError

# The keys an export writes (README, "Export for serving").
MODEL_KEY = "dist_train.model"
DATA_KEY = "dist_train.data"
TOKENIZER_KEY = "dist_train.tokenizer"
STEP_KEY = "dist_train.step"
VERSION_KEY = "dist_train.version"


def serving_metadata(
    manifest: dict[str, Any],
    say: Callable[[str], None],
    vocab_size: int | None = None,
    hf_config: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Metadata from a checkpoint's manifest (which holds the run's resolved config).
    `vocab_size`: the rows of the model's embedding, which a recovered vocabulary must match;
    `hf_config`: a transformers model's complete config (vocab_size, special-token ids)."""
    config = manifest["config"]
    data = config["data"]
    metadata = {
        "format": "pt",  # what transformers and safetensors' own save_model write
        MODEL_KEY: json.dumps(model_record(config["model"], vocab_size, hf_config), sort_keys=True),
        DATA_KEY: json.dumps({k: data.get(k) for k in ("name", "path", "_target_")}),
        STEP_KEY: str(manifest["step"]),
        VERSION_KEY: str(manifest.get("versions", {}).get("dist_train", "")),
        TOKENIZER_KEY: json.dumps(tokenizer_record(data, say, vocab_size), sort_keys=True),
    }
    return metadata


def model_record(
    model: dict[str, Any], vocab_size: int | None, hf_config: dict[str, Any] | None
) -> dict[str, Any]:
    """The run's `model:` section; a `_target_` model's without `name` (ignored with a
    `_target_`, so the default "gpt" there would misname it), with its config when it has one."""
    record = {k: v for k, v in model.items() if not (k == "name" and model.get("_target_"))}
    if vocab_size is not None and not model.get("_target_"):
        record["vocab_size"] = vocab_size
    if hf_config is not None:
        record["config"] = hf_config
    return record


def tokenizer_record(
    data: dict[str, Any], say: Callable[[str], None], vocab_size: int | None = None
) -> dict[str, Any]:
    """How the run's ids map to text: the char alphabet of `data.name=text`; for `tokens`, the
    `tokenizer` entry of its meta.json (dist_train's prepared format; a tokenizer.json's text
    included) with the top level's `vocab_size`, else what nanoGPT's meta.pkl holds (vocab_size;
    its itos alphabet as a char tokenizer). Otherwise `{"type": "none", "reason": ...}`."""
    if data.get("_target_"):
        return _none("data._target_ is a user dataset: its tokenization is not recorded")
    if data.get("name") == "text":
        return _text_alphabet(data, say, vocab_size)
    if data.get("name") != "tokens" or not data.get("path"):
        return _none(f"data.name={data.get('name')} has no tokenizer")
    root = Path(data["path"])  # as the run was given it: relative to where export runs
    if (root / "meta.json").is_file():
        meta = _read_json(root / "meta.json")
        if isinstance(meta.get("tokenizer"), dict):
            entry = {"vocab_size": meta.get("vocab_size"), **meta["tokenizer"]}
            return _with_tokenizer_json(entry, root, say)
        return _missing(f"{root / 'meta.json'} has no `tokenizer` entry", say)
    pkl = read_meta_pkl(root)
    if not pkl:
        return _missing(f"{root} holds no meta.json or meta.pkl", say)
    record: dict[str, Any] = {"vocab_size": pkl.get("vocab_size", len(pkl.get("itos", {})))}
    if "itos" in pkl:
        itos = pkl["itos"]
        record.update(type="char", chars="".join(itos[i] for i in sorted(itos)))
    return record


def _text_alphabet(
    data: dict[str, Any], say: Callable[[str], None], vocab_size: int | None
) -> dict[str, Any]:
    """The alphabet `build_data` derives from the text (code point order), read again: the run
    recorded only where the text was. Checked against the model's vocabulary, so a file changed
    since training is not passed off as the run's tokenizer."""
    if data.get("path"):
        path = Path(data["path"])
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return _missing(f"cannot read {path} again ({type(e).__name__})", say)
    else:
        text = default_corpus(int(data.get("max_chars") or 0))
    chars = char_alphabet(text)
    if vocab_size is not None and len(chars) != vocab_size:
        where = data.get("path") or "the default corpus"
        why = f"{where} now has {len(chars)} characters, the model {vocab_size}"
        return _missing(why, say)
    return {"type": "char", "vocab_size": len(chars), "chars": chars}


def _with_tokenizer_json(
    entry: dict[str, Any], root: Path, say: Callable[[str], None]
) -> dict[str, Any]:
    """A `tokenizers` entry names a file in the data folder: its text goes into the record
    (key `json`), so the export decodes without the data folder."""
    if entry.get("type") != "tokenizers":
        return entry
    path = root / str(entry.get("file", "tokenizer.json"))
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        say(f"note: tokenizer recorded by name only: {path} is missing")
        return entry
    if entry.get("sha256") and hashlib.sha256(text.encode()).hexdigest() != entry["sha256"]:
        say(f"note: tokenizer recorded by name only: {path} differs from meta.json's sha256")
        return entry
    return {**entry, "json": text}


def _missing(why: str, say: Callable[[str], None]) -> dict[str, Any]:
    say(f"note: no tokenizer recorded: {why}")
    return _none(why)


def _none(why: str) -> dict[str, Any]:
    return {"type": "none", "reason": why}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("data.path", str(path), f"unreadable meta.json ({e})") from None
    if not isinstance(value, dict):
        raise ConfigError("data.path", str(path), "meta.json is not a JSON object")
    return value
