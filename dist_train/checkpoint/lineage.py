"""Checkpoint parentage: each manifest names the checkpoint its run continued (`parent`: its
step and id), so a run directory whose checkpoints come from two lineages (a run resumed from
an older checkpoint and saved a step again, while a newer step of the abandoned run is still
there) is detected instead of being continued silently. Pure functions over manifests: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

import xxhash


def checkpoint_id(manifest: Mapping[str, Any]) -> str:
    """What names one checkpoint's content: its step and its files' checksums (their sizes
    in manifests from before checksums). Derived, not random, so the id of a manifest
    written before ids were recorded is computed the same way."""
    files = manifest.get("checksums") or manifest.get("files", {})
    content = json.dumps({"step": manifest["step"], "files": files}, sort_keys=True)
    return xxhash.xxh3_64_hexdigest(content.encode())


def reference(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The `parent` entry of a checkpoint that continues the one `manifest` describes."""
    return {"step": manifest["step"], "id": checkpoint_id(manifest)}


def first_mixed_link(
    start: Mapping[str, Any], present: Callable[[int], Mapping[str, Any] | None]
) -> tuple[int, int] | None:
    """Walk the parents from the checkpoint `start` describes; `present(step)` is the manifest
    of the checkpoint at that step here (None: absent or unreadable). Returns (child, parent),
    the steps of the first link whose parent is present with other content (the child
    continued a checkpoint that was since saved again by another run), or None. An absent
    parent (removed by retention, or in another run directory) and a manifest without a
    parent (a run's first, or from before parents were recorded) end the walk."""
    child = start
    while True:
        parent = child.get("parent")
        if not isinstance(parent, Mapping) or not isinstance(parent.get("step"), int):
            return None
        if parent["step"] >= child["step"]:  # not a parent: steps only grow along a lineage
            return None
        found = present(parent["step"])
        if found is None:
            return None
        if checkpoint_id(found) != parent.get("id"):
            return child["step"], parent["step"]
        child = found
