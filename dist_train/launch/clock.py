"""When a run's command started, for goodput's start-up time: the process's own start (from
/proc on Linux), handed by the launcher of `--nproc N` to its workers through the environment."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

LAUNCHED_AT_ENV = "DIST_TRAIN_LAUNCHED_AT"  # Unix time the launcher of the workers started
STARTTIME_FIELD = 19  # /proc/PID/stat's field 22 (starttime), counted after the `(comm)` field


def process_start() -> float:
    """Unix time this process started: its start in clock ticks after boot, against the time
    since boot (both on the boot clock, both adjusted inside a container's time namespace), to
    ~10 ms. Where /proc cannot tell (not Linux), now: the start-up before it goes uncounted."""
    try:
        stat = Path("/proc/self/stat").read_text()
        ticks = int(stat.rsplit(")", 1)[1].split()[STARTTIME_FIELD])  # comm may hold spaces
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        age = uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return time.time()
    return time.time() - max(0.0, age)


def command_start(whole_process: bool) -> float:
    """When this `dist-train` command started: the process's start where the process was started
    for it (the `dist-train` script, `python -m dist_train`), else now (`main()` called inside a
    longer-lived program, e.g. a test)."""
    return process_start() if whole_process else time.time()


def launched_at(own: float, environ: Mapping[str, str] = os.environ) -> float:
    """A worker's run began when its launcher did (`--nproc N`: the rendezvous and the workers'
    start count as start-up); a process that no launcher of ours started began at `own`."""
    try:
        return float(environ[LAUNCHED_AT_ENV])
    except (KeyError, ValueError):
        return own
