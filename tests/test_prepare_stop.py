"""`dist-train prepare` when it is stopped or cannot finish: its encoding processes end with it
(kill -9 included), a stop signal and a full disk are one line and leave --out as it was, its
output is never read back as input, and a vocabulary too large to learn is refused up front."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from dist_train.data.outdir import OutputDir
from dist_train.data.progress import Progress
from dist_train.errors import ConfigError

from conftest import cli, mount_tmpfs
from helpers_prepare import DOCS, prep
from helpers_scale_out import popen

TEXT = "".join(DOCS)


def _children(pid: int) -> dict[int, str]:
    """pid -> command line of each process whose parent is `pid`."""
    found = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and _parent(entry) == pid:
                found[int(entry.name)] = (entry / "cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
    return found


def _parent(entry: Path) -> int:
    return int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _loaded_numpy(pid: int) -> bool:
    try:
        return "numpy" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _feed(writer: object, text: str) -> None:
    try:
        writer.write(text)  # type: ignore[attr-defined]
        writer.flush()  # type: ignore[attr-defined]
    except OSError:  # prepare was killed while we wrote: the point of the test
        pass


@pytest.mark.slow
def test_encoding_workers_end_with_prepare_even_on_kill_9(tmp_path: Path) -> None:
    """The input is a FIFO: full batches (1 M characters each) reach the workers (a second one
    starts when a batch comes while the first is busy), then prepare waits for more input; kill
    -9 then leaves no process of it behind."""
    fifo = tmp_path / "input.txt"
    os.mkfifo(fifo)
    args = ["--out", "out", "--tokenizer", "bytes", "--workers", "2"]
    proc, everyone = popen("prepare", str(fifo), *args, cwd=tmp_path), []
    try:
        with open(fifo, "w") as writer:  # returns once prepare opened it
            text = "hello world\n" * 220_000
            threading.Thread(target=_feed, args=(writer, text), daemon=True).start()
            _wait_for_a_worker(proc)
            everyone = list(_children(proc.pid))  # the workers, and multiprocessing's tracker
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
            deadline = time.monotonic() + 30  # a hang guard: they go at once (SIGKILL)
            while any(map(_alive, everyone)) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [p for p in everyone if _alive(p)] == []
    finally:
        for pid in [proc.pid, *everyone]:  # what survived (it must not)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def _wait_for_a_worker(proc: subprocess.Popen[str]) -> None:
    """Until an encoding worker has started and imported what it encodes with."""
    deadline = time.monotonic() + 120  # a hang guard
    while time.monotonic() < deadline:
        workers = [p for p, cmd in _children(proc.pid).items() if "spawn_main" in cmd]
        if workers and all(map(_loaded_numpy, workers)):
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no encoding worker: {_children(proc.pid)}")


@pytest.mark.slow
def test_a_stop_signal_during_prepare_says_prepare_stopped(tmp_path: Path) -> None:
    fifo = tmp_path / "input.txt"
    os.mkfifo(fifo)
    proc = popen("prepare", str(fifo), "--out", "out", cwd=tmp_path)
    try:
        with open(fifo, "w"):  # prepare has opened its input (its handlers are long installed)
            os.kill(proc.pid, signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err == "prepare stopped (SIGTERM); out is as it was\n"
    assert not (tmp_path / "out").exists()


def test_a_full_disk_is_one_line_and_leaves_out_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "in.txt").write_text(TEXT * 100)  # ~300 KB: 600 KB of uint16 ids
    full = tmp_path / "full"
    mount_tmpfs(full, "size=64k", "a file system that fills up")
    try:
        proc = cli("prepare", "in.txt", "--out", str(full), "--tokenizer", "bytes", cwd=tmp_path)
        assert (proc.returncode, proc.stdout) == (2, "")
        assert proc.stderr == (
            f"error: --out='{full}': cannot write train.bin (No space left on device); "
            "left as it was\n"
        )
        assert list(full.iterdir()) == []  # its staging folder is gone again
    finally:
        subprocess.run(["umount", str(full)], check=True)


def test_a_failed_write_names_the_file_without_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not Path("/dev/full").exists():
        pytest.skip("needs /dev/full, which fails every write with ENOSPC")
    (tmp_path / "in.txt").write_text(TEXT)
    staged = OutputDir.file
    full = lambda self, name: Path("/dev/full") if name == "train.bin" else staged(self, name)  # noqa: E731
    monkeypatch.setattr(OutputDir, "file", full)
    with pytest.raises(ConfigError, match=r"cannot write train\.bin \(No space left on device\)"):
        prep([tmp_path / "in.txt"], tmp_path / "out", tokenizer="bytes")
    assert not (tmp_path / "out").exists()


def test_out_inside_an_input_folder_is_never_read_as_input(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT)
    out = corpus / "tokens"
    first = prep([corpus], out, tokenizer="bytes")
    again = prep([corpus], out, tokenizer="bytes")  # the folder now holds the first output
    assert (again["train_tokens"], again["sources"]) == (first["train_tokens"], first["sources"])
    pattern = prep([str(corpus / "**" / "*")], out, tokenizer="bytes")  # a glob skips it
    assert pattern["train_tokens"] == first["train_tokens"]
    with pytest.raises(ConfigError, match=r"^INPUT='.*train\.bin': is inside --out .*tokens"):
        prep([out / "train.bin"], out, tokenizer="bytes")


@pytest.mark.slow
def test_a_vocabulary_too_large_to_learn_is_one_line_before_training(tmp_path: Path) -> None:
    """In a subprocess: before, the tokenizers library aborted the whole process."""
    (tmp_path / "in.txt").write_text(TEXT)
    args = ["in.txt", "--out", "out", "--tokenizer", "bpe", "--vocab-size", "1000000000"]
    proc = cli("prepare", *args, cwd=tmp_path, real=True)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("error: --vocab-size=1000000000: at most 1,048,576 (2**20")
    assert proc.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_is_closed_when_prepare_fails(tmp_path: Path) -> None:
    """On a terminal the error line must start on a line of its own, after the bar."""
    pytest.importorskip("tqdm")
    terminal = _Terminal()
    with pytest.raises(ConfigError), Progress("encoding train", 100, stream=terminal) as bar:
        bar.update(40, 10)
        raise ConfigError("INPUT", "x", "a bad line")
    assert terminal.getvalue().endswith("\n") and bar.bar is None
