"""The `model` and `data` sections: one dataclass per built-in model and data source, chosen by
`name` from a registry, each holding only its own keys and checking its own values. A
`_target_` model or dataset gets the common keys only (its own arguments go in `kwargs`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Optional

from dist_train.config.targets import resolve_target
from dist_train.errors import ConfigError

# Field metadata of the settings that define the model or the data stream: a resume may not
# change them (the checkpoint code compares exactly these, see `invariant_keys`).
INVARIANT = MappingProxyType({"invariant": True})


def invariant_keys(config: Any, prefix: str = "") -> list[str]:
    """Dotted names of the fields marked `invariant`, through nested sections: those of the
    model and data classes a config selected (see INVARIANT)."""
    keys = []
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            keys += invariant_keys(value, f"{prefix}{f.name}.")
        elif f.metadata.get("invariant"):
            keys.append(prefix + f.name)
    return keys


def get_key(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def check_fields(
    obj: Any, prefix: str, choices: Mapping[str, Sequence[str]], positive: Sequence[str]
) -> None:
    """Settings that must be one of a few strings, and numbers that must be > 0."""
    for key, allowed in choices.items():
        value = get_key(obj, key)
        if value not in allowed:
            raise ConfigError(prefix + key, value, f"expected one of {', '.join(allowed)}")
    for key in positive:
        if get_key(obj, key) <= 0:
            raise ConfigError(prefix + key, get_key(obj, key), "must be > 0")


def check_widths(values: Sequence[int], key: str, non_empty: bool = False) -> None:
    if (non_empty and not values) or any(v <= 0 for v in values):
        what = "a non-empty list" if non_empty else "a list"
        raise ConfigError(key, list(values), f"expected {what} of numbers > 0")


@dataclass
class Section:
    """What model and data sections share: the keys that select the class, the prefix their
    keys have in messages, and the value checks a class declares by naming its fields."""

    name: str = field(default="", metadata=INVARIANT)  # a registry name; ignored with _target_
    # "package.module.Class" of the user's own model or dataset, called with `kwargs`
    _target_: Optional[str] = field(default=None, metadata=INVARIANT)
    kwargs: dict[str, Any] = field(default_factory=dict, metadata=INVARIANT)

    prefix: ClassVar[str]
    choices: ClassVar[Mapping[str, Sequence[str]]] = MappingProxyType({})  # one of a few strings
    positive: ClassVar[tuple[str, ...]] = ()  # numbers > 0
    non_negative: ClassVar[tuple[str, ...]] = ()  # numbers >= 0, where 0 means "from elsewhere"
    fractions: ClassVar[tuple[str, ...]] = ()  # numbers in [0, 1)

    def validate(self) -> None:
        check_fields(self, self.prefix, self.choices, self.positive)
        for key in self.non_negative:
            if getattr(self, key) < 0:
                raise ConfigError(self.prefix + key, getattr(self, key), "must be >= 0")
        for key in self.fractions:
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ConfigError(self.prefix + key, getattr(self, key), "expected 0 <= x < 1")
        if self._target_:
            resolve_target(self._target_, f"{self.prefix}_target_")


@dataclass
class ModelConfig(Section):
    """Keys every model has."""

    prefix = "model."
    name: str = field(default="gpt", metadata=INVARIANT)  # in MODELS
    dropout: float = 0.0
    init_from: Optional[str] = None  # weights to start from: a checkpoint dir or a .safetensors
    freeze: list[str] = field(default_factory=list)  # parameter-name patterns (fnmatch) to freeze

    fractions = ("dropout",)


@dataclass
class TargetModelConfig(ModelConfig):
    """The section of a `_target_` model (your own, or a transformers class): its arguments go
    in `kwargs`; `block_size` is the length of the windows text/tokens data is cut into."""

    block_size: int = field(default=64, metadata=INVARIANT)

    positive = ("block_size",)


@dataclass
class GPTConfig(ModelConfig):
    """A decoder-only transformer over token windows (data.name=text or tokens)."""

    name: str = field(default="gpt", metadata=INVARIANT)
    n_layer: int = field(default=4, metadata=INVARIANT)  # transformer blocks
    n_head: int = field(default=4, metadata=INVARIANT)  # attention heads per block
    n_embd: int = field(default=128, metadata=INVARIANT)  # residual stream width
    # Context length; also the length of the windows text/tokens data is cut into.
    block_size: int = field(default=64, metadata=INVARIANT)
    bias: bool = field(default=False, metadata=INVARIANT)  # biases in Linear and LayerNorm

    positive = ("n_layer", "n_head", "n_embd", "block_size")

    def validate(self) -> None:
        super().validate()
        if self.n_embd % self.n_head:
            raise ConfigError(
                "model.n_embd", self.n_embd, f"must be divisible by model.n_head={self.n_head}"
            )


@dataclass
class MLPConfig(ModelConfig):
    """Linear-GELU layers on flattened inputs."""

    name: str = field(default="mlp", metadata=INVARIANT)
    hidden_dims: list[int] = field(default_factory=lambda: [128, 128], metadata=INVARIANT)

    def validate(self) -> None:
        super().validate()
        check_widths(self.hidden_dims, "model.hidden_dims")


@dataclass
class CNNConfig(ModelConfig):
    """Conv-GELU-pool stages on [channels, height, width] inputs, then a linear head."""

    name: str = field(default="cnn", metadata=INVARIANT)
    channels: list[int] = field(default_factory=lambda: [16, 32], metadata=INVARIANT)  # per stage

    def validate(self) -> None:
        super().validate()
        check_widths(self.channels, "model.channels")


@dataclass
class DataConfig(Section):
    """Keys every data source has; as it is, the section of a `_target_` dataset."""

    prefix = "data."
    name: str = field(default="text", metadata=INVARIANT)  # in DATA (a user dataset: data.py)
    # Per split, over kwargs: set either and _target_ gets no split= (torchvision style:
    # train_kwargs {train: true}, val_kwargs {train: false}; no val_kwargs: no validation).
    train_kwargs: dict[str, Any] = field(default_factory=dict, metadata=INVARIANT)
    val_kwargs: dict[str, Any] = field(default_factory=dict, metadata=INVARIANT)
    # Background loading (torch DataLoader worker processes; 0: batches built on the training
    # thread). The batches and their order are the same for any value, so these four may
    # change on resume.
    num_workers: int = 0
    prefetch_factor: int = 2  # batches each worker keeps ready
    persistent_workers: bool = True  # keep workers between evaluations (not re-forked)
    pin_memory: str = "auto"  # auto (on CUDA) | true | false
    # "package.module.callable" applied to each sample of a map-style dataset (in the workers),
    # and one that turns a list of samples into a batch (default: torch's default_collate).
    transform: Optional[str] = field(default=None, metadata=INVARIANT)
    collate: Optional[str] = field(default=None, metadata=INVARIANT)

    def validate(self) -> None:
        super().validate()
        if self.num_workers < 0:
            raise ConfigError(
                "data.num_workers", self.num_workers, "must be >= 0 (0: no worker processes)"
            )
        if self.prefetch_factor < 1:
            raise ConfigError("data.prefetch_factor", self.prefetch_factor, "must be >= 1")
        self.pin_memory = str(self.pin_memory).lower()  # YAML's `true` arrives as "True"
        if self.pin_memory not in ("auto", "true", "false"):
            raise ConfigError(
                "data.pin_memory", self.pin_memory, "expected one of auto, true, false"
            )
        for key in ("transform", "collate"):
            value = getattr(self, key)
            if value and not self._target_:
                raise ConfigError(f"data.{key}", value, "applies to a user dataset (data._target_)")
            if value:
                resolve_target(value, f"data.{key}")


@dataclass
class TextDataConfig(DataConfig):
    """Characters of a UTF-8 file as tokens, cut into windows of model.block_size."""

    name: str = field(default="text", metadata=INVARIANT)
    path: Optional[str] = field(default=None, metadata=INVARIANT)  # default: the stdlib source
    # Cap on characters read from the default corpus (0 = all).
    max_chars: int = field(default=2_000_000, metadata=INVARIANT)
    val_fraction: float = field(default=0.1, metadata=INVARIANT)  # tail held out for validation

    non_negative = ("max_chars",)
    fractions = ("val_fraction",)


@dataclass
class TokensDataConfig(DataConfig):
    """nanoGPT's prepared token files, cut into windows of model.block_size."""

    name: str = field(default="tokens", metadata=INVARIANT)
    path: Optional[str] = field(default=None, metadata=INVARIANT)  # dir holding train.bin
    val_fraction: float = field(default=0.1, metadata=INVARIANT)  # without val.bin: its tail
    # 0: meta.json's (or meta.pkl's) vocab_size, else the largest id + 1
    vocab_size: int = field(default=0, metadata=INVARIANT)

    non_negative = ("vocab_size",)
    fractions = ("val_fraction",)


@dataclass
class SyntheticDataConfig(DataConfig):
    """Gaussian inputs labelled by a fixed random teacher network (seeded by train.seed)."""

    name: str = field(default="synthetic", metadata=INVARIANT)
    task: str = field(default="classification", metadata=INVARIANT)  # or regression
    num_samples: int = field(default=4096, metadata=INVARIANT)  # total, before the split
    # One sample's shape, e.g. [32] (mlp) or [3, 16, 16] (cnn).
    input_shape: list[int] = field(default_factory=lambda: [32], metadata=INVARIANT)
    num_classes: int = field(default=10, metadata=INVARIANT)  # classification
    val_fraction: float = field(default=0.1, metadata=INVARIANT)  # random split by seed

    choices = MappingProxyType({"task": ("classification", "regression")})
    positive = ("num_samples", "num_classes")
    fractions = ("val_fraction",)

    def validate(self) -> None:
        super().validate()
        check_widths(self.input_shape, "data.input_shape", non_empty=True)


# The registry: `name` -> section class. A new built-in model or data source is one class and
# one entry here (its builder goes in models/ or data.py).
MODELS: dict[str, type[ModelConfig]] = {"gpt": GPTConfig, "mlp": MLPConfig, "cnn": CNNConfig}
DATA: dict[str, type[DataConfig]] = {
    "text": TextDataConfig,
    "tokens": TokensDataConfig,
    "synthetic": SyntheticDataConfig,
}
# Per section: the class of a `_target_` (the common keys) and the built-in ones by name.
SECTIONS: dict[str, tuple[type[Section], Mapping[str, type[Section]]]] = {
    "model": (TargetModelConfig, MODELS),
    "data": (DataConfig, DATA),
}


def section_class(section: str, target: Any, name: Any) -> type[Section]:
    """The class of `model`/`data` for its `_target_` or, without one, its `name`."""
    common, registry = SECTIONS[section]
    if target:
        return common
    if name not in registry:
        raise ConfigError(f"{section}.name", name, f"expected one of {', '.join(registry)}")
    return registry[name]
