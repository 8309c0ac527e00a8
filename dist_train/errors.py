"""User-facing errors: the CLI prints them as one line and exits with status 2."""

from __future__ import annotations

from typing import Any


class DistTrainError(Exception):
    """An error caused by user input, not by a bug in dist_train."""


class ConfigError(DistTrainError):
    """A config key holds a value that cannot work; names the key, the value and what would."""

    def __init__(self, key: str, value: Any, reason: str) -> None:
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key}={value!r}: {reason}")
