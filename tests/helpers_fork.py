"""`dist-train ARGS` in a forked child of the test process. Torch and dist_train are loaded
already, so a launcher (of `--nproc N`, a sweep, a benchmark) starts in milliseconds instead of
the seconds an interpreter and torch's import take; what it starts (torchrun's workers, a
sweep's variants) are processes of their own, exactly as a user's."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping
from pathlib import Path

import torch
import torch._dynamo  # what every run loads (its optimizer): once here, not in every child
import torch.distributed.run  # the launcher's agent

import dist_train.cli.main
import dist_train.train.build  # noqa: F401  (what a run builds from)


def fork_main(
    args: list[str],
    cwd: Path,
    environ: Mapping[str, str],
    timeout: float,
) -> subprocess.CompletedProcess[str]:
    """`main(args)` in a child with `cwd` and exactly `environ`, stdin from /dev/null, its own
    process group (a hang ends it with everything it started). Returns what `subprocess.run(..., capture_output=True, text=True)` would; a child
    that outlives `timeout` is killed and fails the test with its output."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            _child(args, cwd, environ, out.fileno(), err.fileno())
        deadline = time.monotonic() + timeout
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                output, errors = _read(out, err)
                raise AssertionError(
                    f"hung: dist-train {' '.join(args)} after {timeout} s\n{output[-2000:]}\n"
                    f"{errors[-3000:]}"
                )
            time.sleep(0.02)
        return subprocess.CompletedProcess(
            ["dist-train", *args], os.waitstatus_to_exitcode(status), *_read(out, err)
        )


def _read(*files: tempfile._TemporaryFileWrapper[bytes]) -> list[str]:
    texts = []
    for f in files:
        f.seek(0)
        texts.append(f.read().decode(errors="replace"))
    return texts


def _child(
    args: list[str],
    cwd: Path,
    environ: Mapping[str, str],
    out: int,
    err: int,
) -> None:
    code = 1
    try:
        gc.freeze()  # the test process's objects: never collected here (a run calls gc.collect)
        os.setpgid(0, 0)
        null = os.open(os.devnull, os.O_RDONLY)
        for fd, target in ((null, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(environ)
        # The test process's OpenMP threads do not exist here, and GNU OpenMP hangs in the first
        # parallel region of a fork whose parent had used them: one thread, no region (a
        # launcher computes little; its workers are fresh processes with threads of their own).
        torch.set_num_threads(1)
        from dist_train.cli.main import main

        try:
            main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
