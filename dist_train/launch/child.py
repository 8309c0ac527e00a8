"""One child process run the way a sweep runs its variants: stop signals passed on to it, its
output appended to a log file by the child itself and shown line by line as it comes, and (on
Linux) a SIGTERM to it if the parent dies, so that it saves and stops instead of training on
unowned."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import BinaryIO

# Signals passed on to the running variant. SIGHUP (the terminal went away) becomes SIGTERM:
# the variant saves and stops instead of dying unsaved.
FORWARD = {
    signal.SIGINT: signal.SIGINT,
    signal.SIGTERM: signal.SIGTERM,
    signal.SIGUSR1: signal.SIGUSR1,
    signal.SIGHUP: signal.SIGTERM,
}
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class Forwarder:
    """Records the first stop signal and passes every one on to the running variant."""

    def __init__(self) -> None:
        self.signum = 0
        self.child: subprocess.Popen[bytes] | None = None

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.signum = self.signum or signum
        self.forward(signum)

    def forward(self, signum: int) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.send_signal(FORWARD[signal.Signals(signum)])

    @contextmanager
    def installed(self) -> Iterator[Forwarder]:
        before = {s: signal.signal(s, self._handle) for s in FORWARD}
        try:
            yield self
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)


def _child_setup() -> Callable[[], None]:
    """Runs in the variant's process before it starts: its own process group, so a Ctrl-C
    reaches it once (forwarded by us), not twice; on Linux, SIGTERM when the sweep dies (even
    by SIGKILL), so a variant never trains on unowned."""
    prctl = None
    if sys.platform == "linux":
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl

    def setup() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return setup


def run_child(
    cmd: list[str], log_path: Path, prefix: str, fwd: Forwarder, say: Callable[[str], None]
) -> tuple[int, str]:
    """Run one variant, its output appended to `log_path` and shown with `prefix`. Returns its
    exit status and its last `error` line (else its last line). The variant writes to the file
    itself, not to a pipe of ours: if the sweep dies, it still saves and exits cleanly."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out, open(log_path, "rb") as reader:
        out.write(f"$ {shlex.join(cmd)}  # {time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode())
        out.flush()
        reader.seek(out.tell())
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as they come, not at exit
            preexec_fn=_child_setup(),
        )
        fwd.child = proc
        try:
            if fwd.signum:  # arrived while it was starting
                fwd.forward(fwd.signum)
            lines = follow(reader, proc, lambda line: say(prefix + line))
        except BaseException:
            proc.terminate()  # the sweep itself failed: the variant saves and stops
            proc.wait()
            raise
        finally:
            fwd.child = None
    last = next((line.strip() for line in reversed(lines) if line.strip()), "")
    error = next((line.strip() for line in reversed(lines) if line.startswith("error")), "")
    if proc.returncode < 0:
        error = f"killed by {signal.Signals(-proc.returncode).name}"
    return proc.returncode, (error or last).removeprefix("error: ")


def follow(
    reader: BinaryIO, proc: subprocess.Popen[bytes], show: Callable[[str], None]
) -> list[str]:
    """Show the lines a running process appends to a file until it exits; returns the last
    ones (for its error line)."""
    tail: deque[str] = deque(maxlen=50)
    pending = b""
    while True:
        exited = proc.poll() is not None  # before the read: then that read gets everything
        *lines, pending = (pending + reader.read()).split(b"\n")
        if exited and pending:
            lines, pending = [*lines, pending], b""
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            tail.append(line)
            show(line)
        if exited:
            return list(tail)
        time.sleep(0.1)
