"""Work is never lost around a healthy run: one owner per run directory, no silent fresh start
over an earlier run, non-finite training stopped before it is saved, metrics that read as one
run, a schedule that a resume does not re-stretch, and corrupted checkpoints named."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.checkpoint.export import load_model_weights
from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.errors import ConfigError, NonFiniteError
from dist_train.launch.rundir import LOCK

from conftest import CLI, TINY_GPT, cli, mount_tmpfs, run_on_ranks, train_in_process

RUN = [
    *TINY_GPT,
    "train.max_steps=10",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "train.eval_every=0",
    "train.eval_batches=1",
    "optim.warmup_steps=0",
]
QUICK = ["configs/quickstart.yaml", *RUN, "data.max_chars=50000"]


def records(run_dir: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines()]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def one_line(proc: subprocess.CompletedProcess[str], fragment: str) -> str:
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], proc.stderr
    return lines[0]


# --- one owner per run directory ----------------------------------------------------------


@pytest.mark.slow
def test_fresh_start_over_an_earlier_run_is_refused_and_overwrite_moves_it_aside(
    tmp_path: Path,
) -> None:
    run = tmp_path / "run"
    assert cli("train", *QUICK, f"train.run_dir={run}").returncode == 0
    before = snapshot(run)
    line = one_line(cli("train", *QUICK, f"train.run_dir={run}", "resume=none"), "earlier run")
    assert "train.overwrite=true" in line and snapshot(run) == before  # nothing touched
    proc = cli("train", *QUICK, f"train.run_dir={run}", "train.overwrite=true", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr
    assert "moved the earlier run" in proc.stdout
    (aside,) = (run / "previous").iterdir()
    assert [r["step"] for r in records(aside) if "loss" in r] == list(range(1, 11))
    assert [p.name for p in complete_checkpoints(aside / "checkpoints")] == ["step_0000010"]
    assert [r["step"] for r in records(run) if "loss" in r] == [1, 2, 3, 4]
    assert [p.name for p in complete_checkpoints(run / "checkpoints")] == ["step_0000004"]


def start(run_dir: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return subprocess.Popen(
        [
            str(CLI),
            "train",
            *QUICK,
            f"train.run_dir={run_dir}",
            "train.max_steps=100000",
            "checkpoint.every_steps=5",
            *extra,
        ],
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_second_run_into_a_busy_run_directory_exits_2_naming_the_holder(tmp_path: Path) -> None:
    run = tmp_path / "busy"
    first = start(run)
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.2)
        for extra in ([], ["--nproc", "2"], ["resume=none"]):
            line = one_line(cli("train", *QUICK, f"train.run_dir={run}", *extra), "in use by")
            assert f"pid {first.pid} on host {socket.gethostname()}" in line
    finally:
        first.terminate()
        first.communicate(timeout=60)
    steps = [r["step"] for r in records(run) if "loss" in r]  # every line is whole JSON
    assert steps == list(range(1, len(steps) + 1))  # one run's records, nobody else's
    assert not (run / LOCK).exists()  # released on SIGTERM too


def test_stale_and_foreign_locks(tmp_path: Path) -> None:
    from dist_train.launch.rundir import RunLock

    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / LOCK).write_text(
        json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": 0, "command": "old"})
    )
    said: list[str] = []
    lock = RunLock(run)
    lock.acquire(said.append)  # the holder is gone: taken over, with a word
    assert "stale lock" in said[0] and json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (run / LOCK).exists() and run.is_dir()  # a directory it did not create stays
    (run / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": 0}))
    with pytest.raises(ConfigError, match=f"if that run is gone, delete {run / LOCK}"):
        RunLock(run).acquire(said.append)
    fresh = RunLock(tmp_path / "new")
    fresh.acquire()
    fresh.release()
    assert not (tmp_path / "new").exists()  # failed before writing anything: no trace


@pytest.mark.slow
def test_owner_removes_interrupted_save_debris(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert cli("train", *QUICK, f"train.run_dir={run}", "train.max_steps=4").returncode == 0
    debris = run / "checkpoints/.tmp_step_0000099"
    debris.mkdir()
    (debris / "__0_0.distcp").write_bytes(b"x" * 1000)
    proc = cli("train", *QUICK, f"train.run_dir={run}", "train.max_steps=6")
    assert proc.returncode == 0 and "removed 1 incomplete checkpoint folder" in proc.stdout
    assert not debris.exists()


# --- non-finite training --------------------------------------------------------------------


def all_finite(path: Path) -> bool:
    return all(torch.isfinite(t).all() for t in load_model_weights(str(path), "x").values())


def test_nonfinite_stop_names_the_step_and_saves_nothing_non_finite(tmp_path: Path) -> None:
    run = [
        *RUN,
        "optim.lr=1e9",
        "optim.grad_clip=0",
        "checkpoint.every_steps=1",
        f"train.run_dir={tmp_path}",
        "checkpoint.keep_last=1",
    ]
    with pytest.raises(NonFiniteError, match=r"not finite at step \d+|loss is nan in steps"):
        train_in_process(run)
    saved = complete_checkpoints(tmp_path / "checkpoints")
    assert saved and all(all_finite(p) for p in saved)  # retention kept the last finite one
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)  # strict JSON (no NaN tokens)


def test_nan_in_the_data_stops_on_every_rank(tmp_path: Path) -> None:
    run = [
        "train.device=cpu",
        "model._target_=user_plugins.TinyRegressor",
        "model.kwargs.in_features=8",
        "data._target_=user_plugins.PoisonedLineDataset",
        "train.global_batch_size=256",
        "train.max_steps=3",
        "log.every_steps=1",
        "log.progress=never",
        "checkpoint.enabled=false",
        f"train.run_dir={tmp_path}",
    ]
    with pytest.raises(AssertionError) as err:  # both ranks fail, each with the same error
        run_on_ranks(train_in_process, 2, run)
    assert "ranks exited [1, 1]" in str(err.value)
    assert (
        str(err.value).count(
            "NonFiniteError: train.on_nonfinite=stop: the training loss is nan in steps 1..1"
        )
        == 2
    )


def test_nonfinite_skip_counts_and_gives_up_after_a_run_of_skips(tmp_path: Path) -> None:
    run = [
        *RUN,
        "train.on_nonfinite=skip",
        "train.max_nonfinite_skips=3",
        "optim.lr=1e9",
        "optim.grad_clip=0",
        "train.max_steps=30",
        f"train.run_dir={tmp_path}",
    ]
    with pytest.raises(NonFiniteError, match=r"4 updates in a row .*max_nonfinite_skips=3"):
        train_in_process(run)
    logged = records(tmp_path)
    assert logged[-1]["nonfinite_skips"] >= 3
    assert all(r["loss"] is None or math.isfinite(r["loss"]) for r in logged)


def test_fp16_loss_scale_collapse_warns_once(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = [
        *RUN,
        "precision.dtype=fp16",
        "precision.warn_loss_scale=1e30",
        f"train.run_dir={tmp_path}",
        "train.max_steps=3",
    ]
    train_in_process(run)
    out = capfd.readouterr().out
    assert out.count("warning: the fp16 loss scale fell to") == 1


# --- metrics, schedule and precision across a resume ----------------------------------------


def test_metrics_read_as_one_run_after_a_resume(tmp_path: Path) -> None:
    run = [*RUN, "checkpoint.every_steps=5", "train.eval_every=5", f"train.run_dir={tmp_path}"]
    train_in_process(run, stop_at=8)  # steps 6..8 logged, then the crash: resume is at 5
    train_in_process(run)
    steps = [r["step"] for r in records(tmp_path) if "loss" in r]
    assert steps == list(range(1, 11))
    assert [r["step"] for r in records(tmp_path, "metrics.discarded.jsonl")] == [6, 7, 8]


def test_metrics_lines_are_whole_even_when_the_disk_is_full(tmp_path: Path) -> None:
    # A file-size limit stands in for a full disk: the write stops part-way, as ENOSPC does.
    code = f"""
import os, resource, signal
from pathlib import Path
from dist_train.errors import DistTrainError
from dist_train.track.metrics import append_line
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
path = Path({str(tmp_path / "m.jsonl")!r})
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
append_line(fd, '{{"step": 1}}\\n', path)
resource.setrlimit(resource.RLIMIT_FSIZE, (20, resource.RLIM_INFINITY))
try:
    append_line(fd, '{{"step": 2, "loss": 1.0}}\\n', path)
except DistTrainError as e:
    print("ERR", e)
"""
    proc = subprocess.run(
        [str(Path(CLI).parent / "python"), "-c", code], capture_output=True, text=True, timeout=60
    )
    assert "ERR" in proc.stdout and "while writing metrics" in proc.stdout, proc.stderr
    assert (tmp_path / "m.jsonl").read_text() == '{"step": 1}\n'


def test_raising_max_steps_keeps_the_schedule_and_min_lr_is_reached(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = [*RUN, "optim.lr=1e-2", "optim.min_lr=1e-3", f"train.run_dir={tmp_path}"]
    train_in_process(run)
    assert [r for r in records(tmp_path) if "lr" in r][-1]["lr"] == pytest.approx(
        1e-3
    )  # the last step is at min_lr
    train_in_process([*run, "train.max_steps=14"])
    lrs = [r["lr"] for r in records(tmp_path) if "loss" in r]
    assert lrs[10:] == pytest.approx([1e-3] * 4)  # no jump back up after the resume
    assert "the cosine keeps its horizon of 10 steps" in capfd.readouterr().out
    assert (
        read_manifest(complete_checkpoints(tmp_path / "checkpoints")[-1])["config"]["optim"][
            "decay_steps"
        ]
        == 10
    )


def test_switching_to_fp16_on_resume_starts_a_fresh_scaler(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    run = [*RUN, f"train.run_dir={tmp_path}"]
    train_in_process([*run, "train.max_steps=4"])
    result = train_in_process([*run, "train.max_steps=6", "precision.dtype=fp16"])
    assert sorted(result["losses"]) == [5, 6]
    assert "fp16 starts a fresh loss scaler" in capfd.readouterr().out
    train_in_process([*run, "train.max_steps=8", "precision.dtype=fp32"])  # and back


# --- corrupted checkpoints ------------------------------------------------------------------


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(8))
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def test_corrupted_shard_is_named_and_an_intact_older_one_offered(tmp_path: Path) -> None:
    run = [*RUN, "checkpoint.every_steps=5", f"train.run_dir={tmp_path}"]
    train_in_process(run)
    step5, step10 = complete_checkpoints(tmp_path / "checkpoints")
    shard = next(step10.glob("*.distcp"))
    flip(shard, shard.stat().st_size // 2)  # same size, different bytes
    with pytest.raises(
        ConfigError, match=rf"{shard.name} \(checksum mismatch\).*newest intact one is {step5}"
    ):
        train_in_process([*run, "train.max_steps=12"])
    with pytest.raises(ConfigError, match="checksum mismatch"):
        load_model_weights(str(step10), "checkpoint")  # export and init_from check too
    (step10 / ".metadata").unlink()
    with pytest.raises(ConfigError, match=r"step_0000010 is damaged .* newest complete one"):
        train_in_process([*run, "train.max_steps=12"])


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_keeps_the_previous_one(tmp_path: Path) -> None:
    small = tmp_path / "small"
    mount_tmpfs(small, "size=2m", "a small filesystem that fills up")
    try:
        proc = cli(
            "train",
            "configs/quickstart.yaml",
            *RUN,
            "model.n_embd=64",
            "model.n_layer=2",
            "checkpoint.every_steps=5",
            f"train.run_dir={small / 'run'}",
        )
    finally:
        listing = sorted(p.name for p in (small / "run/checkpoints").iterdir())
        subprocess.run(["umount", str(small)], capture_output=True)
    line = one_line(proc, "No space left on device")
    assert line.startswith("error: checkpoint: cannot write") and "step_0000005 is intact" in line
    assert listing == ["step_0000005"]  # the partial step_10 removed, the previous one kept
