"""Progress of a long pass over input bytes (`dist-train prepare`): a bar or periodic lines."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """A tqdm bar on a terminal when tqdm is installed (`pip install 'dist-train[progress]'`);
    otherwise one line on the stream every `every_s` seconds (none for a shorter pass)."""

    def __init__(
        self, desc: str, total: int, stream: TextIO | None = None, every_s: float = 10.0
    ) -> None:
        self.stream = stream or sys.stderr
        self.desc, self.total, self.every_s = desc, total, every_s
        self.done = self.tokens = 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if self.stream.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                bar_args = {"unit": "B", "unit_scale": True, "file": self.stream}
                self.bar = tqdm(total=total, desc=desc, **bar_args)

    def update(self, nbytes: int, ntokens: int = 0) -> None:
        self.done, self.tokens = self.done + nbytes, self.tokens + ntokens
        if self.bar is not None:
            if ntokens:
                self.bar.set_postfix_str(f"{self.tokens:,} tokens", refresh=False)
            self.bar.update(nbytes)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            rate = self.done / 1e6 / max(now - self.start, 1e-9)
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            tokens = f", {self.tokens:,} tokens" if self.tokens else ""
            print(
                f"{self.desc}: {self.done / 1e6:.1f} of {self.total / 1e6:.1f} MB{share}"
                f"{tokens}, {rate:.1f} MB/s",
                file=self.stream,
                flush=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()  # also on an error or a stop, so that its line comes after the bar

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
