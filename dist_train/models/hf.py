"""Hugging Face `transformers` models by `_target_`: built from their config class (no
download), weights from a local `save_pretrained` folder. Nothing here imports transformers: a
`_target_` naming one of its classes has imported it already, so `import dist_train` never does.
"""

from __future__ import annotations

import copy
import inspect
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from dist_train.errors import ConfigError, first_line

if TYPE_CHECKING:
    from dist_train.config.schema import ModelConfig
    from dist_train.data.datasets import DataSpec

# What `save_pretrained` writes: one file, or shards listed in an index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json")


def is_hf_class(obj: Any) -> bool:
    """A transformers model class (a `PreTrainedModel` subclass)."""
    transformers = sys.modules.get("transformers")
    return (
        transformers is not None
        and isinstance(obj, type)
        and issubclass(obj, transformers.PreTrainedModel)
    )


def is_pretrained_dir(source: str | None) -> bool:
    """A `save_pretrained` folder (config.json), as opposed to one of our checkpoints."""
    return bool(source) and (Path(str(source)) / "config.json").is_file()


def build_hf_model(cls: type[nn.Module], cfg: ModelConfig, spec: DataSpec) -> nn.Module:
    """`cls(config)`: the config from `model.init_from`'s config.json when that is a
    `save_pretrained` folder, else the config class's defaults; `model.kwargs` over either.
    The weights are loaded later, by `load_pretrained` (not on a resume)."""
    config = make_config(cls, cfg, spec)
    _check_fits_data(config, cfg, spec)
    try:
        return cls(config)
    except Exception as e:
        raise ConfigError(
            "model.kwargs",
            dict(cfg.kwargs),
            f"{cls.__name__}({type(config).__name__}) raised {type(e).__name__}: {first_line(e)}",
        ) from None


def make_config(cls: type[nn.Module], cfg: ModelConfig, spec: DataSpec) -> Any:
    """The config `build_hf_model` builds `cls` from (`dist-train export` rebuilds it too)."""
    config_cls = cls.config_class  # type: ignore[attr-defined]
    defaults = config_cls()
    _check_keys(config_cls, defaults, cfg.kwargs)
    values: dict[str, Any] = {}
    if is_pretrained_dir(cfg.init_from):
        values = _read_config(str(cfg.init_from), config_cls)
    elif spec.task == "lm" and spec.vocab_size and hasattr(defaults, "vocab_size"):
        values.update(_data_vocabulary(defaults, spec.vocab_size))
    if hasattr(defaults, "use_cache"):
        values["use_cache"] = False  # training never reads a key/value cache: no memory for it
    values.update(cfg.kwargs)
    try:
        return config_cls.from_dict(values)
    except Exception as e:  # the config class's own validation (e.g. heads vs width)
        raise ConfigError(
            "model.kwargs",
            dict(cfg.kwargs),
            f"{config_cls.__name__} rejects it: {type(e).__name__}: {first_line(e)}",
        ) from None


def _data_vocabulary(defaults: Any, vocab_size: int) -> dict[str, Any]:
    """The data's vocabulary (unless kwargs say otherwise). The default special-token ids
    point into the original vocabulary (GPT-2's 50256): past the data's they mean nothing, and
    transformers would warn about each on every rank."""
    values: dict[str, Any] = {"vocab_size": vocab_size}
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token = getattr(defaults, name, None)
        if isinstance(token, int) and token >= vocab_size:
            values[name] = None
    return values


def _check_keys(config_cls: type, defaults: Any, kwargs: dict[str, Any]) -> None:
    """Config classes store any keyword silently; a misspelled one would be ignored."""
    known = set(inspect.signature(config_cls.__init__).parameters) - {"self", "kwargs"}
    known |= set(getattr(config_cls, "attribute_map", {}))  # aliases, e.g. hidden_size
    unknown = [k for k in kwargs if k not in known and not hasattr(defaults, k)]
    if unknown:
        raise ConfigError(
            "model.kwargs",
            dict(kwargs),
            f"{config_cls.__name__} has no field {', '.join(map(repr, unknown))}",
        )


def _read_config(folder: str, config_cls: type) -> dict[str, Any]:
    try:
        values = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("model.init_from", folder, f"config.json is unreadable ({e})") from None
    found, wanted = values.get("model_type"), getattr(config_cls, "model_type", None)
    if found and wanted and found != wanted:
        raise ConfigError(
            "model.init_from",
            folder,
            f"config.json describes a {found!r} model; model._target_ builds {wanted!r}",
        )
    return values


def _check_fits_data(config: Any, cfg: ModelConfig, spec: DataSpec) -> None:
    """Token data must fit the embedding and the position table: checked here, not as an
    index error inside the first forward pass."""
    if spec.task != "lm":
        return
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and vocab < spec.vocab_size:
        key = "model.init_from" if is_pretrained_dir(cfg.init_from) else "model.kwargs"
        raise ConfigError(
            key,
            cfg.init_from if key == "model.init_from" else dict(cfg.kwargs),
            f"vocab_size {vocab} is smaller than the data's vocabulary ({spec.vocab_size})",
        )
    context = getattr(config, "max_position_embeddings", None)
    if isinstance(context, int) and spec.tokens_per_sample > context:
        raise ConfigError(
            "model.block_size",
            spec.tokens_per_sample,
            f"training windows are longer than the model's context "
            f"({type(config).__name__}.max_position_embeddings={context})",
        )


def load_pretrained(model: nn.Module, source: str, key: str) -> dict[str, list[str]]:
    """Copy a `save_pretrained` folder's weights into `model` (built from that folder's
    config). transformers' own loader reads them: sharded files, tied weights it leaves out
    (GPT-2's lm_head), renamed keys, a new task head initialized like transformers does.
    Returns transformers' account by name: `missing_keys` (not in the folder) and
    `mismatched_keys` (another shape), both newly initialised; `unexpected_keys` (unused)."""
    if not hasattr(type(model), "from_pretrained") or not hasattr(model, "config"):
        raise ConfigError(
            key,
            source,
            f"a save_pretrained folder needs a transformers model._target_, "
            f"not {type(model).__name__}",
        )
    if not any((Path(source) / name).is_file() for name in WEIGHT_FILES):
        raise ConfigError(
            key, source, f"holds config.json but no weights ({' or '.join(WEIGHT_FILES)})"
        )
    try:
        loaded, info = type(model).from_pretrained(  # type: ignore[attr-defined]
            source,
            config=copy.deepcopy(model.config),
            use_safetensors=True,
            output_loading_info=True,
        )
    except Exception as e:
        raise ConfigError(key, source, f"{type(e).__name__}: {first_line(e)}") from None
    # Same class and config, so the same names; copied in the model's own dtype (fp32).
    model.load_state_dict(loaded.state_dict())
    # Names, or (name, shapes...) tuples for mismatched ones in some transformers versions.
    return {
        kind: sorted(str(k[0] if isinstance(k, tuple) else k) for k in info.get(kind, ()))
        for kind in ("missing_keys", "mismatched_keys", "unexpected_keys")
    }


def causal_lm_context(model: nn.Module) -> int | None:
    """The context length of a transformers model that generates text from a prompt alone
    (a causal LM, not an encoder-decoder), else None."""
    config, can_generate = getattr(model, "config", None), getattr(model, "can_generate", None)
    if config is None or not callable(can_generate) or getattr(config, "is_encoder_decoder", True):
        return None
    context = getattr(config, "max_position_embeddings", None)
    return context if isinstance(context, int) and can_generate() else None
