"""Checksums of checkpoint files (XXH3-64, via `xxhash`), and the check of a folder against
its manifest. No DCP here: `dist-train check` and `export` use it before any DCP import."""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import xxhash

CHUNK = 64 << 20  # bytes hashed per call


def file_digest(path: Path) -> str:
    """XXH3-64 of a whole file. Hashed through a memory map: no copy out of the page cache
    (a read into a buffer costs more CPU than the hash), and xxhash releases the GIL, so the
    other threads of the process keep running while it hashes."""
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                if hasattr(mapped, "madvise"):
                    mapped.madvise(mmap.MADV_SEQUENTIAL)
                view = memoryview(mapped)
                try:
                    for start in range(0, size, CHUNK):
                        h.update(view[start : start + CHUNK])
                finally:
                    view.release()
    return h.hexdigest()


def damaged_files(
    manifest: dict[str, Any], folder: Path, names: Sequence[str] | None = None
) -> list[str]:
    """Files of `folder` that are missing, of the wrong size, or fail their checksum; `names`
    limits the check (None: all). Manifests from before checksums were kept are checked by size."""
    sizes, sums = manifest["files"], manifest.get("checksums", {})
    bad = []
    for name in sizes if names is None else names:
        path = folder / name
        size = path.stat().st_size if path.is_file() else None
        if size != sizes[name]:
            bad.append(f"{name} ({size} bytes, expected {sizes[name]})")
        elif name in sums and file_digest(path) != sums[name]:
            bad.append(f"{name} (checksum mismatch)")
    return bad
