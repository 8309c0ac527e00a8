"""A sweep's grid: `key=a,b,c` words become the variants (their cartesian product, in the order
given), each with a readable, unique, file-system-safe name; `sweep.json` pins the grid to its
sweep directory so that a rerun continues the same sweep, never a different one."""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dist_train.errors import ConfigError
from dist_train.experiments.results import write_atomic

SWEEP_FILE = "sweep.json"
RUN_DIR_KEY = "train.run_dir"
MAX_NAME = 100  # characters of a variant's directory name; longer ones end in a short hash
UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")  # anything else in a name becomes "_"
OPEN, CLOSE, QUOTES = "[{(", "]})", "'\""


@dataclass(frozen=True)
class Variant:
    name: str  # its run directory under the sweep directory
    overrides: tuple[str, ...]  # the varying `key=value` words


@dataclass(frozen=True)
class Grid:
    fixed: tuple[str, ...]  # `key=value` words given with one value: the same for every variant
    axes: tuple[tuple[str, tuple[str, ...]], ...]  # (key, values) of the varying keys

    def variants(self) -> list[Variant]:
        keys = [key for key, _ in self.axes]
        combos = list(itertools.product(*(values for _, values in self.axes)))
        names = unique_names([variant_name(keys, combo) for combo in combos])
        return [
            Variant(name, tuple(f"{k}={v}" for k, v in zip(keys, combo, strict=True)))
            for name, combo in zip(names, combos, strict=True)
        ]


def split_values(text: str) -> list[str]:
    """`a,b,c` -> [a, b, c]; commas inside brackets or quotes belong to the value, so lists
    (`model.hidden_dims=[64,64],[128]`) and quoted strings (`'a,b'`) sweep as one value each."""
    values, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in QUOTES:
            quote = ch
        elif ch in OPEN:
            depth += 1
        elif ch in CLOSE:
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i])
            start = i + 1
    values.append(text[start:])
    return values


def parse_grid(overrides: Sequence[str]) -> Grid:
    fixed: list[str] = []
    axes: list[tuple[str, tuple[str, ...]]] = []
    seen: set[str] = set()
    for word in overrides:
        key, _, text = word.partition("=")
        if key in seen:
            raise ConfigError(key, text, "given twice; list all of its values once: key=a,b,c")
        seen.add(key)
        # The run directory is never swept (it names the sweep directory) and may hold commas.
        values = [text] if key == RUN_DIR_KEY else split_values(text)
        if len(values) == 1:
            fixed.append(word)
            continue
        if not all(values) or len(set(values)) < len(values):
            raise ConfigError(key, text, "expected distinct, non-empty values separated by commas")
        axes.append((key, tuple(values)))
    return Grid(tuple(fixed), tuple(axes))


def variant_name(keys: Sequence[str], values: Sequence[str]) -> str:
    """`optim.lr=1e-3, model.n_layer=2` -> `lr=1e-3,n_layer=2`: each key's last part, unless two
    keys share it (then the whole key); `run` when nothing varies."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    short = [s if last.count(s) == 1 else k for s, k in zip(last, keys, strict=True)]
    # `[64, 64]` -> `64_64`: brackets, quotes and spaces dropped, inner commas kept apart from
    # the commas between keys
    plain = [re.sub(r"[\[\]{}()'\" ]", "", v).replace(",", "_") or "_" for v in values]
    name = UNSAFE.sub("_", ",".join(f"{s}={v}" for s, v in zip(short, plain, strict=True)))
    if len(name) > MAX_NAME:
        name = f"{name[: MAX_NAME - 9]}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"
    return name or "run"


def unique_names(names: Sequence[str]) -> list[str]:
    """Values that differ only in unsafe characters (`a/b`, `a:b`) get `-2`, `-3`, ..."""
    taken: set[str] = set()
    out = []
    for name in names:
        candidate, n = name, 1
        while candidate in taken:
            n += 1
            candidate = f"{name}-{n}"
        taken.add(candidate)
        out.append(candidate)
    return out


def sweep_record(config: Path, grid: Grid) -> dict[str, Any]:
    return {
        "config": str(config.resolve()),
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "fixed": list(grid.fixed),
        "axes": {key: list(values) for key, values in grid.axes},
        "variants": [{"name": v.name, "overrides": list(v.overrides)} for v in grid.variants()],
    }


def pin_grid(sweep_dir: Path, record: dict[str, Any], key: str, say: Callable[[str], None]) -> None:
    """Write sweep.json, or check that the one there describes this same sweep (`key`: the
    setting that named the directory, for the error)."""
    path = sweep_dir / SWEEP_FILE
    if not path.is_file():
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
        return
    try:
        before = json.loads(path.read_text())
    except ValueError:
        raise ConfigError(key, str(sweep_dir), f"{path} is not valid JSON") from None
    differ = [k for k in ("config", "fixed", "axes") if before.get(k) != record[k]]
    if differ:
        was = "; ".join(f"{k} {before.get(k)} (now {record[k]})" for k in differ)
        raise ConfigError(
            key,
            str(sweep_dir),
            f"holds another sweep: {was}; rerun it with its own arguments, or use another {key}",
        )
    if before.get("config_sha256") != record["config_sha256"]:
        say(
            f"note: {record['config']} has changed since this sweep started; the variants done "
            "already are not trained again"
        )


def sweep_variants(sweep_dir: Path) -> list[str]:
    """The names of a sweep's variants (their run directories), in grid order."""
    try:
        return [v["name"] for v in json.loads((sweep_dir / SWEEP_FILE).read_text())["variants"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError("sweep", str(sweep_dir), f"unreadable {SWEEP_FILE}") from None
