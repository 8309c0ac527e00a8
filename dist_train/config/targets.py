"""User code named by import path in a config (`_target_`, `data.transform`, ...): found and
called with one-line errors that name the key."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from dist_train.errors import ConfigError, install_hint


def resolve_target(target: str, key: str) -> Any:
    """Import "package.module.Attr"; ConfigError when it cannot be found."""
    module_name, _, attr = target.rpartition(".")
    if not module_name:
        raise ConfigError(key, target, "expected 'package.module.Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        reason = f"cannot import module '{module_name}': {e}{install_hint(e)}"
        raise ConfigError(key, target, reason) from None
    if not hasattr(module, attr):
        raise ConfigError(key, target, f"module '{module_name}' has no attribute '{attr}'")
    return getattr(module, attr)


def call_target(target: str, key: str, kwargs_key: str, **kwargs: Any) -> Any:
    """Build a user's `_target_` class. Arguments its signature does not take name
    `kwargs_key`; whatever its constructor raises becomes one line naming `key`, the call and
    the user's own message (their code, their input)."""
    cls = resolve_target(target, key)
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(
            kwargs_key,
            target if kwargs_key == key else kwargs,
            f"{target}({args}) does not fit its signature {inspect.signature(cls)}: {e}",
        ) from None
    except ValueError:  # no signature to inspect (a builtin): let the call decide
        pass
    try:
        return cls(**kwargs)
    except Exception as e:
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ConfigError(
            key, target, f"{cls.__name__}({args}) raised {type(e).__name__}: {detail}"
        ) from None
