"""Checksums computed while DCP writes the shards (`checksums.py` verifies them later).

xxHash's XXH3-64 (the `xxhash` package) hashes at memory speed (~20 GB/s on one core here), so
hashing the bytes as they stream to disk costs a few percent of a save; zlib's crc32 runs at
1-4 GB/s and would cost as much as the write itself. Each rank hashes the shard files it
writes, in DCP's own writer thread, and leaves the digest in a small side file that rank 0
folds into the manifest at commit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import xxhash
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.filesystem import FileSystem
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner

from dist_train.checkpoint.checksums import file_digest

SIDE = ".xxh3"  # "<shard>.xxh3" holds a shard's digest until the commit moves it to the manifest


class HashingStream:
    """A write stream that hashes what passes through it (everything else is the file's)."""

    def __init__(self, stream: Any) -> None:
        self._stream, self._hash = stream, xxhash.xxh3_64()

    def write(self, data: Any) -> int:
        self._hash.update(data)
        return self._stream.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def __getattr__(self, name: str) -> Any:  # tell, fileno (fsync), flush, close ...
        return getattr(self._stream, name)


class HashingFileSystem(FileSystem):
    """DCP's file system, with each shard's digest written beside it as it is closed."""

    @contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Iterator[Any]:
        with super().create_stream(path, mode) as stream:
            if "w" not in mode or not str(path).endswith(".distcp"):
                yield stream
                return
            hashing = HashingStream(stream)
            yield hashing
        Path(f"{path}{SIDE}").write_text(hashing.hexdigest())


class HashingWriter(FileSystemWriter):
    """FileSystemWriter whose shard files leave `<name>.xxh3` digests (rank by rank).
    `written`: called once this rank's shards are written, before DCP finishes the save (where
    a test's fault strikes in a synchronous save)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        written: Callable[[], None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(path, **kwargs)
        self.fs = HashingFileSystem()
        self.written = written

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        result = super().write_data(plan, planner)  # written by now: the future is done
        if self.written is not None:
            self.written()
        return result


def collect_digests(folder: Path) -> dict[str, str]:
    """Digests of every file in a finished save: the shards' from their side files (which are
    removed), the small rest (.metadata, RNG files) hashed here."""
    digests = {}
    for side in folder.rglob(f"*{SIDE}"):
        digests[str(side.relative_to(folder))[: -len(SIDE)]] = side.read_text()
        side.unlink()
    for path in folder.rglob("*"):
        name = str(path.relative_to(folder))
        if path.is_file() and name not in digests:
            digests[name] = file_digest(path)
    return digests
