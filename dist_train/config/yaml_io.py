"""Reading a config's YAML file and its `key=value` overrides, with one-line errors.

OmegaConf parses every override value as YAML, so `train.sample_prompt=ROMEO:` would become the
mapping {ROMEO: null}; a value that YAML reads as a mapping or list for a string setting is
taken as the string the user typed instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from dist_train.errors import ConfigError


def read_yaml(path: Path) -> DictConfig:
    """The file's top-level mapping; a syntax error names file:line:column."""
    try:
        node = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError("config", where, f"invalid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("config", str(path), f"cannot read it ({e})") from None
    if not isinstance(node, DictConfig):
        kind = "a list" if isinstance(node, Sequence) else "a single value"
        raise ConfigError(
            "config",
            str(path),
            f"expected a mapping of sections (model:, data:, train:, ...) "
            f"at the top level, found {kind}",
        )
    return node


def check_sections(node: DictConfig, schema: Any, where: str) -> None:
    """A section given as a plain value (`train: 5`) instead of a mapping of its keys."""
    for f in dataclasses.fields(schema):
        section, value = getattr(schema, f.name), node.get(f.name)
        if dataclasses.is_dataclass(section) and not isinstance(value, DictConfig | None):
            names = ", ".join(x.name for x in dataclasses.fields(section))
            raise ConfigError(
                f.name, value, f"in {where}: expected a mapping of its settings ({names})"
            )


def field_annotation(schema: Any, dotted: str) -> str:
    """The declared type (as written) of a dotted key, '' when it is not a declared field."""
    node: Any = schema
    annotation = ""
    for part in dotted.split("."):
        declared = dataclasses.fields(node) if dataclasses.is_dataclass(node) else ()
        found = next((f for f in declared if f.name == part), None)
        if found is None:
            return ""
        annotation, node = str(found.type), getattr(node, part)
    return annotation


def parse_overrides(overrides: Sequence[str], schema: Any, notes: list[str]) -> DictConfig:
    """`key=value` words as one config to merge last (old key names noted in `notes`)."""
    merged = OmegaConf.create()
    for item in overrides:
        if "=" not in item:
            raise ConfigError("override", item, "expected key=value")
        key, raw = item.split("=", 1)
        if key in RENAMED:
            notes.append(renamed_note(key))
        key = ALIASES.get(key, key)
        parsed = OmegaConf.from_dotlist([f"{key}={raw}"])
        value = OmegaConf.select(parsed, key)
        annotation = field_annotation(schema, key)
        if isinstance(value, DictConfig | ListConfig) and annotation in ("str", "Optional[str]"):
            parsed = OmegaConf.create(_nested(key, raw))
        merged = OmegaConf.merge(merged, parsed)
    return merged


def _nested(key: str, value: Any) -> dict[str, Any]:
    node: dict[str, Any] = {}
    cursor = node
    parts = key.split(".")
    for part in parts[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[parts[-1]] = value
    return node


def shipped_configs_dir() -> Path:
    """The example configs: inside the package when installed from a wheel, else the checkout's."""
    package = Path(__file__).resolve().parents[1]  # dist_train/, above config/
    installed = package / "configs"
    return installed if installed.is_dir() else package.parent / "configs"


def resolve_config_path(path: str | Path) -> Path:
    """A YAML file as given, or else a shipped config named `configs/NAME.yaml`, `NAME.yaml` or
    `NAME`, so that the README's commands work from any directory after a `pip install`."""
    given = Path(path)
    if given.is_file():
        return given
    shipped = shipped_configs_dir()
    if given.parent in (Path("."), Path("configs")):
        candidate = shipped / (given.name if given.suffix else f"{given.name}.yaml")
        if candidate.is_file():
            return candidate
    names = ", ".join(sorted(p.stem for p in shipped.glob("*.yaml")))
    reason = "is a directory" if given.is_dir() else "file not found"
    raise ConfigError(
        "config", str(path), f"{reason}; expected a YAML file or a shipped config ({names})"
    )


# Keys renamed since an earlier release: configs (and the config.yaml of earlier runs) that use
# the old name still load, with a one-line note.
RENAMED = {"train.sample_chars": "train.sample_tokens"}
# `async` is a Python keyword, so the field is async_save; users may write either, silently.
ALIASES = {"checkpoint.async": "checkpoint.async_save", **RENAMED}


def renamed_note(old: str) -> str:
    return f"{old} is now {RENAMED[old]} (the old name still works)"


def aliased(node: Any, notes: list[str]) -> Any:
    """`node` with old key names replaced by the current ones; a note for each renamed key."""
    for alias, key in ALIASES.items():
        section, _, name = alias.partition(".")
        sub = node.get(section) if isinstance(node, DictConfig) else None
        if isinstance(sub, DictConfig) and name in sub:
            sub[key.partition(".")[2]] = sub.pop(name)
            if alias in RENAMED:
                notes.append(renamed_note(alias))
    return node


def as_config_error(
    e: OmegaConfBaseException, overrides: Sequence[str], schema: Any
) -> ConfigError:
    """OmegaConf's error as one line naming the key (and, for an unknown key, the valid ones)."""
    key = getattr(e, "full_key", None) or "config"
    given = dict(o.split("=", 1) for o in overrides if "=" in o)
    value = getattr(e, "value", None) if getattr(e, "value", None) is not None else given.get(key)
    if isinstance(e, ConfigKeyError):
        section, _, _ = key.rpartition(".")
        node: Any = schema
        for part in filter(None, section.split(".")):
            node = getattr(node, part, None)
        valid = (
            ", ".join(f.name for f in dataclasses.fields(node))
            if dataclasses.is_dataclass(node)
            else ""
        )
        return ConfigError(key, value, "unknown key" + (f" (valid: {valid})" if valid else ""))
    return ConfigError(key, value, str(e).splitlines()[0])
