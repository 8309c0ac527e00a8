"""Bytes this process has allocated, as its allocator counts them, and their peak over a window.

CPU: glibc's `mallinfo2()` (bytes in use in every arena plus mmapped chunks; torch's CPU tensors
come from malloc), read after every aten op while a window is open (a dispatch mode), so a peak
is missed only inside one op. CUDA: the caching allocator's own counters. Elsewhere (macOS,
musl: no `mallinfo2`) there is no meter, and the caller falls back to tensor sizes.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

Reader = Callable[[], int]


class _Mallinfo2(ctypes.Structure):
    # glibc >= 2.33, <malloc.h>: every field a size_t (mallinfo's were int: wrapped above 2 GiB)
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def glibc_in_use() -> Reader | None:
    """A reader of malloc's bytes in use (`uordblks`: allocated in all arenas, `hblkhd`: in
    mmapped chunks, which large tensors get), or None without glibc's `mallinfo2`."""
    try:
        fn = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype, fn.argtypes = _Mallinfo2, []

    def read() -> int:
        info = fn()
        return int(info.uordblks + info.hblkhd)

    return read


class _PeakAfterEachOp(TorchDispatchMode):
    """Reads the allocator after every aten op it sees (those of the autograd engine and of
    C++ callers such as DDP's reducer too: the mode is thread state the engine carries)."""

    def __init__(self, read: Reader) -> None:
        super().__init__()
        self.read = read
        self.peak = read()

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.read())
        return out


class Window:
    """The peak over one `MemoryMeter.window()`, in bytes (set when the window closes)."""

    peak: int = 0


class MemoryMeter:
    """`in_use()` now, and `window()`: the largest `in_use()` while it was open."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.source: str | None = "cuda allocator" if device.type == "cuda" else None
        self._read: Reader | None = None
        if device.type != "cuda":
            self._read = glibc_in_use()
            self.source = "glibc mallinfo2" if self._read else None

    @property
    def available(self) -> bool:
        return self.source is not None

    def in_use(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the allocator's figure once queued work ran
            return torch.cuda.memory_allocated(self.device)
        return self._read() if self._read else 0

    @contextmanager
    def window(self) -> Iterator[Window]:
        out = Window()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            try:
                yield out
            finally:
                torch.cuda.synchronize(self.device)
                out.peak = torch.cuda.max_memory_allocated(self.device)
            return
        if self._read is None:
            yield out
            return
        with _PeakAfterEachOp(self._read) as mode:
            yield out
        out.peak = max(mode.peak, self._read())
