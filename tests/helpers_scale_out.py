"""Shared by the scale-out tests: the tiny run, the real `dist-train` started in its own session,
its losses per step, and a stop signal sent to the launcher after a few steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from conftest import CLI, REPO, TESTS, wait_for_metrics
from helpers import TINY_GPT

# decay_steps is fixed so that runs of different lengths follow the same schedule step by step.
RUN = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "model.dropout=0.1",
    "optim.decay_steps=400",
    "log.every_steps=1",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "train.global_batch_size=8",
]


def popen(*argv: str, cwd: Path) -> subprocess.Popen[str]:
    """The real `dist-train` in its own session (signals go to it alone), piped."""
    # The checkout under test first (as conftest's `cli`): not an editable install's.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        env.pop(var, None)
    return subprocess.Popen(
        [str(CLI), *argv],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env=env,
    )


def start(run_dir: Path, *args: str) -> subprocess.Popen[str]:
    """`dist-train train` for 100000 steps, until a signal stops it."""
    run = [*RUN, *args, "train.max_steps=100000", f"train.run_dir={run_dir}"]
    return popen("train", *run, cwd=run_dir.parent)


def losses(run_dir: Path) -> dict[int, float]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def stop_with(proc: subprocess.Popen[str], run_dir: Path, signum: int) -> tuple[str, float]:
    """Wait for a few steps, send `signum` to the launcher alone; stderr and seconds to exit."""
    try:
        wait_for_metrics(run_dir, proc)
        while len(losses(run_dir)) < 3:
            time.sleep(0.05)
        os.kill(proc.pid, signum)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=120)
        return err, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
