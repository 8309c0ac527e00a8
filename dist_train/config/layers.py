"""Which model and data section a config selects, layer by layer (defaults < YAML file <
overrides), and the keys each layer may give it: a key that is not the selection's is one line
naming it and the valid ones."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from omegaconf import DictConfig, OmegaConf

from dist_train.config.sections import SECTIONS, Section, section_class
from dist_train.errors import ConfigError

Selection = tuple[Any, Any]  # (_target_, name): a _target_ wins over the name

# Every config.yaml written before per-model sections held one flat model and data section
# with the keys of all built-in models (data sources) at once, whatever was selected: a file
# section holding all of these is such a record, and the keys not of its selection are dropped.
# Frozen history, not a registry: new models never join it.
FLAT_KEYS = {
    "model": frozenset(
        {"n_layer", "n_head", "n_embd", "block_size", "bias", "hidden_dims", "channels"}
    ),
    "data": frozenset(
        {"path", "max_chars", "vocab_size", "task", "num_samples", "input_shape", "num_classes"}
    ),
}


def selection(node: Any, below: Selection) -> Selection:
    """What one layer's section selects: its own `_target_`/`name` over those below it."""
    if not isinstance(node, DictConfig):
        return below
    target = node.get("_target_") if "_target_" in node else below[0]
    name = node.get("name") if "name" in node else below[1]
    return target, name


def describe(section: str, chosen: Selection) -> str:
    target, name = chosen
    return f"{section}._target_={target}" if target else f"{section}.name={name}"


def key_names(cls: type[Section]) -> list[str]:
    return [f.name for f in fields(cls)]  # type: ignore[arg-type]


def own_class(section: str, chosen: Selection) -> type[Section] | None:
    """The class a layer below the final one selected; None for a name that is not valid (only
    the final selection has to be)."""
    try:
        return section_class(section, *chosen)
    except ConfigError:
        return None


def fit_section(
    section: str, node: DictConfig, chosen: Selection, cls: type[Section], dropped: set[str]
) -> None:
    """Remove the `dropped` keys that `cls` lacks from `node[section]`; any other key it lacks is
    an error naming the selection and listing the keys it has."""
    sub = node.get(section)
    if not isinstance(sub, DictConfig):
        return
    valid = key_names(cls)
    for key in [str(k) for k in sub]:
        if key in valid:
            continue
        if key in dropped:
            del sub[key]
            continue
        value = OmegaConf.to_container(sub, resolve=False)[key]  # type: ignore[index]
        whose = [n for n, c in SECTIONS[section][1].items() if key in key_names(c)]
        hint = f" (a key of {section}.name={'/'.join(whose)})" if whose else ""
        raise ConfigError(
            f"{section}.{key}",
            value,
            f"unknown key: not a key of {describe(section, chosen)}{hint}; "
            f"valid: {', '.join(valid)}",
        )


def fit_layers(defaults: Any, file: DictConfig, given: DictConfig) -> dict[str, type[Section]]:
    """The class each of `model`/`data` selects over the dataclass defaults, the YAML file and
    the overrides; prunes the file in place. When the overrides select another model (data
    source) than the file, the file's keys of its own selection that the new one lacks are
    dropped: they described the model that was switched away from."""
    classes = {}
    for section in SECTIONS:
        base = getattr(defaults, section)
        in_file = selection(file.get(section), (base._target_, base.name))
        final = selection(given.get(section), in_file)
        cls = section_class(section, *final)
        dropped: set[str] = set()
        if in_file != final and (switched_from := own_class(section, in_file)) is not None:
            dropped |= set(key_names(switched_from))
        sub = file.get(section)
        if isinstance(sub, DictConfig) and FLAT_KEYS[section] <= set(sub.keys()):
            dropped |= FLAT_KEYS[section]
        fit_section(section, file, final, cls, dropped)
        fit_section(section, given, final, cls, set())
        classes[section] = cls
    return classes
