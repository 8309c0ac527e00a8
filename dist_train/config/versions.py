"""The oldest torch whose APIs dist_train uses, checked once at start-up without importing torch."""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

from dist_train.errors import ConfigError

# 2.9 added DCP's DefaultStager/StagingOptions and async_save(async_stager=...), which the
# checkpointer's reused staging copy relies on; fully_shard and get_total_norm are older (2.6).
MIN_TORCH = (2, 9)


def parse_version(text: str) -> tuple[int, ...]:
    """ "2.13.0+cpu" -> (2, 13, 0), "2.10.0rc1" -> (2, 10, 0): the leading dotted numbers."""
    match = re.match(r"\d+(\.\d+)*", text)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def check_torch_version(installed: str | None = None) -> None:
    """ConfigError naming both versions when the installed torch is older than MIN_TORCH."""
    if installed is None:
        try:
            installed = version("torch")
        except PackageNotFoundError:  # e.g. a source build on sys.path: trust its own number
            import torch

            installed = torch.__version__
    if parse_version(installed)[:2] < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ConfigError(
            "torch",
            installed,
            f"dist_train needs torch >= {need}; "
            f"install a newer build, e.g. pip install 'torch>={need}'",
        )
