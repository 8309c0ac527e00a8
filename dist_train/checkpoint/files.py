"""Checkpoint folders on disk: discovery, manifest, and the checks run before any collective."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

import dist_train
from dist_train.checkpoint.checksums import damaged_files
from dist_train.checkpoint.lineage import first_mixed_link
from dist_train.config.schema import RunConfig
from dist_train.config.sections import invariant_keys
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv
from dist_train.parallel.wrap import resolve_strategy

MANIFEST = "manifest.json"
QUIET_MESSAGE = "torch.distributed is disabled"  # DCP's warning when told no_dist=True
STEP_DIR = re.compile(r"^step_(\d+)$")
# Hidden names of step folders, never resumed: being written (`.tmp_step_N`), set aside by a
# commit that replaces `step_N` (`.old_step_N`), being deleted by retention (`.del_step_N`).
TMP, ASIDE, DELETING = ".tmp_", ".old_", ".del_"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


def is_complete(path: Path) -> bool:
    return (
        STEP_DIR.match(path.name) is not None
        and (path / ".metadata").is_file()
        and (path / MANIFEST).is_file()
    )


def step_of(path: Path) -> int:
    match = STEP_DIR.match(path.name)
    return int(match.group(1)) if match else -1


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete step folders under `root`, oldest first; `.tmp_*` leftovers never count."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if is_complete(p)), key=step_of)


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint to resume from: `auto` = newest complete one in the run dir (or none)."""
    if cfg.resume == "none":
        return None
    if cfg.resume == "auto":
        root = Path(cfg.train.run_dir) / "checkpoints"
        found = complete_checkpoints(root)
        newest = found[-1] if found else None
        check_no_damaged_newer(root, newest)
        if newest is not None:
            check_one_lineage(found)
        return newest
    return find_checkpoint(cfg.resume, "resume")


def check_no_damaged_newer(root: Path, newest: Path | None) -> None:
    """A `step_N` folder exists only once complete (atomic rename), so one without DCP's
    .metadata or our manifest that is newer than the newest complete one was damaged after the
    fact: say so instead of silently resuming from an older step."""
    if not root.is_dir():
        return
    damaged = [
        p
        for p in root.iterdir()
        if STEP_DIR.match(p.name) and not is_complete(p) and step_of(p) > step_of(newest or root)
    ]
    if damaged:
        use = f"resume={newest} uses the newest complete one" if newest else "none is complete"
        raise ConfigError(
            "resume",
            "auto",
            f"{max(damaged, key=step_of)} is damaged (its .metadata or manifest.json is "
            f"missing); {use}, or move the damaged folder away",
        )


def check_one_lineage(found: list[Path]) -> None:
    """`resume: auto` continues the newest checkpoint only if the checkpoints it descends from
    here are the ones it was trained from: after a run resumed from an older checkpoint and
    saved a step again, a newer step of the abandoned run would continue the other lineage
    (with the other run's settings) without a word."""
    by_step = {step_of(p): p for p in found}

    def present(step: int) -> dict[str, Any] | None:
        try:
            manifest = read_manifest(by_step[step]) if step in by_step else None
        except ConfigError:  # unreadable: the load says so, this check is not the one
            return None
        return manifest if isinstance(manifest, dict) and "step" in manifest else None

    newest = present(step_of(found[-1]))
    mixed = first_mixed_link(newest, present) if newest is not None else None
    if mixed is not None:
        child, parent = by_step[mixed[0]], by_step[mixed[1]]
        raise ConfigError(
            "resume",
            "auto",
            f"the checkpoints in {parent.parent} mix two runs: {child.name} continues a "
            f"{parent.name} that a later run (resumed from an older checkpoint) saved again; "
            f"resume={parent} continues the later run, resume={child} the earlier one",
        )


def find_checkpoint(value: str, key: str) -> Path:
    """A complete checkpoint folder, or the newest one in a run dir or its checkpoints/ dir."""
    path = Path(value)
    if not path.exists():
        raise ConfigError(key, value, "no such checkpoint or run directory")
    if path.is_symlink():  # checkpoints/best
        path = path.resolve()
    if is_complete(path):
        return path
    found = complete_checkpoints(path / "checkpoints") or complete_checkpoints(path)
    if not found:
        raise ConfigError(key, value, "holds no complete checkpoint (partial saves are ignored)")
    return found[-1]


def flat_config(cfg: RunConfig | dict[str, Any]) -> dict[str, Any]:
    # asdict: the same plain values as OmegaConf's container of the config, 100x faster.
    container = cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)
    flat: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and key != "kwargs":
                walk(value, f"{prefix}{key}.")
            else:
                flat[f"{prefix}{key}"] = value

    walk(container, "")
    return flat


def invariant_settings(cfg: RunConfig, config: RunConfig | dict[str, Any]) -> dict[str, Any]:
    """The settings of `config` (this run's, or a manifest's record) that a run cannot change
    when it resumes: the fields `cfg`'s sections mark invariant (the model's shape, the data
    stream, the global batch, seed, optimizer). Everything else (max_steps, log and eval
    intervals, micro-batch, lr, data loading workers ...) may change. A record keeps only
    these keys of its own, so one written with the old flat sections (every model's keys)
    compares the same."""
    keys = invariant_keys(cfg)
    nested = tuple(f"{k}." for k in keys)  # a dict setting is flattened to its entries
    return {k: v for k, v in flat_config(config).items() if k in keys or k.startswith(nested)}


def manifest_for(
    cfg: RunConfig,
    env: DistEnv,
    step: int,
    samples_seen: int,
    folder: Path,
    checksums: dict[str, str],
    tied: list[list[str]],
) -> dict[str, Any]:
    invariant = invariant_settings(cfg, cfg)
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    return {
        "step": step,
        "samples_seen": samples_seen,
        "world_size": env.world_size,
        "strategy": resolve_strategy(cfg.parallel, env.world_size),
        "versions": {
            "dist_train": dist_train.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "config_hash": hashlib.sha256(json.dumps(invariant, sort_keys=True).encode()).hexdigest()[
            :16
        ],
        "config": dataclasses.asdict(cfg),
        "tied": tied,  # model state-dict names that are one tensor (state.tied_names)
        "files": files,
        "checksums": checksums,  # XXH3-64 per file (integrity.collect_digests)
    }


def point_best(root: Path, step: int) -> None:
    """`checkpoints/best`, a relative symlink to the best checkpoint's folder, replaced
    atomically (a path for `resume`, `export` and `sample`)."""
    target, link = step_name(step), root / "best"
    if link.is_symlink() and os.readlink(link) == target:
        return
    tmp = root / ".best.tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError("resume", str(path), f"unreadable checkpoint manifest ({e})") from None


def check_compatible(cfg: RunConfig, manifest: dict[str, Any], path: Path) -> None:
    saved, now = invariant_settings(cfg, manifest["config"]), invariant_settings(cfg, cfg)
    diff = [
        f"{k} ({saved.get(k)!r} -> {now.get(k)!r})"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diff:
        raise ConfigError(
            "resume",
            str(path),
            "these settings differ from the checkpoint's and cannot change on "
            f"resume: {', '.join(diff)} (use a new train.run_dir, or train.overwrite=true to start over here)",
        )


def check_files(
    manifest: dict[str, Any], path: Path, key: str = "resume", checksums: bool = True
) -> None:
    """Every file present with the size it was written with (truncation, lost files) and, with
    `checksums`, the same bytes (silent corruption): else one line naming the file and, where
    there is one, the newest older checkpoint that is intact."""
    bad = damaged_files(manifest, path) if checksums else size_mismatches(manifest, path)
    if bad:
        raise corrupted(key, path, bad)


def size_mismatches(manifest: dict[str, Any], path: Path) -> list[str]:
    return damaged_files({"files": manifest["files"]}, path)  # without checksums: sizes only


def corrupted(key: str, path: Path, bad: Sequence[str]) -> ConfigError:
    more = f" and {len(bad) - 1} more file(s)" if len(bad) > 1 else ""
    return ConfigError(key, str(path), f"corrupted checkpoint: {bad[0]}{more}; {intact_hint(path)}")


def intact_hint(path: Path) -> str:
    """Which older complete checkpoint would serve instead (each checked in full, newest first:
    this runs only once something is already wrong)."""
    for older in reversed(
        [p for p in complete_checkpoints(path.parent) if step_of(p) < step_of(path)]
    ):
        try:
            if not damaged_files(read_manifest(older), older):
                return f"the newest intact one is {older} (resume={older} uses it)"
        except ConfigError:
            continue
    return "no older checkpoint here is intact"


def read_tensor_metadata(path: Path) -> dict[str, Any]:
    # Imported here: `dist-train check` reads manifests only and should not pay for DCP.
    from torch.distributed.checkpoint import FileSystemReader

    try:
        return FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:
        raise ConfigError("resume", str(path), f"unreadable checkpoint metadata ({e})") from None


def check_shapes(state: dict[str, Any], path: Path) -> None:
    """Compare the model's tensors with the checkpoint's metadata, locally on every rank, so a
    mismatch is an error on all of them before DCP's collectives start (never a hang)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = read_tensor_metadata(path)
    problems = []
    for name, tensor in state["model"].items():
        meta = saved.get(f"model.{name}")
        if not isinstance(meta, TensorStorageMetadata):
            problems.append(f"{name} missing")
        elif tuple(meta.size) != tuple(tensor.shape):
            problems.append(f"{name} {tuple(meta.size)} in checkpoint vs {tuple(tensor.shape)}")
    extra = [k[6:] for k in saved if k.startswith("model.") and k[6:] not in state["model"]]
    problems += [f"{name} unexpected" for name in extra]
    if problems:
        raise ConfigError(
            "resume", str(path), f"checkpoint does not fit this model: {'; '.join(problems[:8])}"
        )


@contextmanager
def single_process_quiet() -> Iterator[None]:
    """DCP warns that it "assumes" a single process even when told so (no_dist=True)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=QUIET_MESSAGE)
        yield


def fsync_dir(path: Path) -> None:
    """Make a rename durable: the directory entry itself must reach the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
