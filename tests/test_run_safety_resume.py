"""Work is never lost across a resume: metrics that read as one run (whole lines even on a full
disk), a schedule that a resume does not re-stretch, a precision switch, and corrupted or
unwritable checkpoints named, with the intact one kept or offered."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from dist_train.checkpoint.export import load_model_weights
from dist_train.checkpoint.files import complete_checkpoints, read_manifest
from dist_train.errors import ConfigError

from conftest import CLI, cli, mount_tmpfs
from helpers import train_in_process
from helpers_run_safety import RUN, one_line, records

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
