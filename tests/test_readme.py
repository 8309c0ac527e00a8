"""The README followed as a new user follows it: every `bash` block, in order, in one fresh
directory, after the Quickstart's `make train`. Each command must exit 0 and leave what its
sentence says; training commands get `SHRINK` appended (the README says so under Development),
so the whole walk takes minutes, not hours.

A block preceded by `<!-- readme-test: skip REASON -->` is not run (benchmarks: minutes each,
run by tests/test_bench_smoke.py); `make test` is the suite itself, `source` and `pip install`
are the environment the test already has (the extras named must exist), and `curl` fetches the
text that `../shared/data` holds (or a generated one)."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import REPO, TESTS, cli

# Appended to every command that trains (train, sweep, torchrun): 20 steps, with evaluations,
# saves and a sample inside them. Later overrides win, so the README's own step counts give way.
SHRINK = [
    "train.max_steps=20",
    "train.eval_every=10",
    "train.eval_batches=2",
    "checkpoint.every_steps=10",
    "log.every_steps=5",
    "train.sample_tokens=20",
    "log.progress=never",
]
SKIP = re.compile(r"<!-- readme-test: skip (.+?) -->\s*$")
CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def bash_blocks(readme: str) -> list[tuple[int, str | None, list[str]]]:
    """(line number, skip reason or None, commands) of every ```bash block, continuation lines
    joined."""
    lines, blocks = readme.splitlines(), []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            start, body = i + 1, []
            i += 1
            while lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            previous = next((x for x in reversed(lines[: start - 1]) if x.strip()), "")
            skip = SKIP.search(previous)
            joined = "\n".join(body).replace("\\\n", " ")
            blocks.append((start + 1, skip.group(1) if skip else None, joined.splitlines()))
        i += 1
    return blocks


def test_the_readme_has_blocks_and_every_skip_says_why() -> None:
    blocks = bash_blocks((REPO / "README.md").read_text())
    assert len(blocks) >= 8
    assert all(reason is None or len(reason) > 10 for _, reason, _ in blocks)
    assert sum(reason is not None for _, reason, _ in blocks) <= 1  # only the benchmarks
    # The README tells what the walk appends: the same words
    assert " ".join(SHRINK) in " ".join((REPO / "README.md").read_text().split())


def _extras() -> set[str]:
    """The names of pyproject.toml's optional dependencies (no tomllib before Python 3.11)."""
    text = (REPO / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]\n", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([a-z0-9-]+) = \[", section, flags=re.MULTILINE))


class Walk:
    """The user's shell: one directory, the commands in order, what each left behind."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)]),
            "WANDB_MODE": "offline",
        }
        self.ran: list[str] = []

    def run(self, words: list[str]) -> subprocess.CompletedProcess[str] | None:
        head = words[0]
        if words[:2] == ["make", "train"]:
            recipe = (REPO / "Makefile").read_text().split("\ntrain: setup\n\t", 1)[1]
            assert recipe.startswith("$(BIN)/dist-train train configs/quickstart.yaml $(ARGS)")
            return self.dist_train(["train", "configs/quickstart.yaml"])
        if words[:2] == ["make", "test"]:
            assert (REPO / ".ci" / "run").read_text().strip().endswith("make test")
            return None
        if head == "source":
            return None
        if head == "pip":
            for extra in re.findall(r"\[([a-z,]+)\]", " ".join(words))[0].split(","):
                assert extra in _extras(), extra
            return None
        if head == "curl":
            out = self.home / words[words.index("-sSLo") + 1]
            if CORPUS.exists():
                shutil.copy(CORPUS, out)
            else:  # a user's machine: any text of some size
                out.write_text("".join(f"line {i}: to be or not to be.\n" for i in range(20000)))
            return None
        if head == "tensorboard":
            logdir = self.home / words[words.index("--logdir") + 1]
            assert list(logdir.glob("events.out.tfevents.*")), logdir
            return None
        tokenizer = self.home / "tokenizer.json"  # a Hugging Face tokenizer file of the user's
        wanted = words[:2] == ["dist-train", "prepare"] and tokenizer.name in words
        if wanted and not tokenizer.exists():
            shutil.copy(next(self.home.glob("data/*/tokenizer.json")), self.home)
        if head == "dist-train":
            return self.dist_train(words[1:])
        if words[:3] == ["python", "-m", "dist_train"]:
            return self.dist_train(words[3:])
        if head == "torchrun":
            torchrun = Path(sys.executable).with_name("torchrun")
            return subprocess.run(
                [str(torchrun), *shrunk(words[1:])],
                cwd=self.home,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=600,
                stdin=subprocess.DEVNULL,
            )
        raise AssertionError(f"the README shows a command this test does not know: {words}")

    def dist_train(self, args: list[str]) -> subprocess.CompletedProcess[str]:
        trains = args[0] in ("train", "sweep")
        return cli(*(shrunk(args) if trains else args), cwd=self.home, env=self.env, timeout=600)


def shrunk(args: list[str]) -> list[str]:
    """`SHRINK` in place of the README's own values for those keys (a sweep refuses a key given
    twice)."""
    keys = {item.split("=", 1)[0] for item in SHRINK}
    return [a for a in args if a.split("=", 1)[0] not in keys] + SHRINK


def users_own_files(home: Path) -> None:
    """What "Preparing data" names as the user's own inputs: JSON lines, a Parquet file, a
    folder of text files and a validation file (a tokenizer.json comes from an earlier
    prepare)."""
    docs = [f"document {i}: the quick brown fox jumps over the lazy dog.\n" * 20 for i in range(60)]
    (home / "corpus").mkdir()
    for part in range(2):
        lines = [json.dumps({"text": d}) for d in docs[part::2]]
        (home / "corpus" / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pyarrow.table({"content": docs}), home / "data.parquet")
    (home / "train").mkdir()
    for i, doc in enumerate(docs[:40]):
        (home / "train" / f"{i:03d}.txt").write_text(doc)
    (home / "valid.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[40:]))


@pytest.mark.slow
def test_the_readme_in_order(tmp_path: Path) -> None:
    walk = Walk(tmp_path)
    users_own_files(tmp_path)
    for line, skip, commands in bash_blocks((REPO / "README.md").read_text()):
        if skip is not None:
            continue
        for command in commands:
            words = shlex.split(command, comments=True)
            if not words:
                continue
            proc = walk.run(words)
            said = f"README line {line}: {command}"
            if proc is not None:
                out = proc.stdout + proc.stderr
                assert proc.returncode == 0, f"{said}\n{out[-3000:]}"
                assert "Traceback" not in out, f"{said}\n{out[-3000:]}"
                for check in CHECKS:
                    check(words, proc, tmp_path)
            walk.ran.append(command)
    assert len(walk.ran) >= 25


def _option(words: list[str], name: str) -> str | None:
    return words[words.index(name) + 1] if name in words else None


def _run_dir(words: list[str]) -> str | None:
    chosen = [w.split("=", 1)[1] for w in words if w.startswith("train.run_dir=")]
    return chosen[-1] if chosen else None


def trains_to_the_end(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    """A training command on a new run directory trains all its steps; `make train`'s run, run
    again, says it is done."""
    if "train" not in words[:4] or "check" in words:
        return
    run_dir = _run_dir(words)
    if run_dir is None:
        assert "done: 20 steps" in proc.stdout or "done already" in proc.stdout, proc.stdout
        return
    assert "done: 20 steps" in proc.stdout, proc.stdout[-2000:]
    assert (home / run_dir / "checkpoints" / "step_0000020").is_dir()


def samples(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    if words[:2] != ["dist-train", "sample"]:
        return
    prompt = _option(words, "--prompt")
    assert proc.stdout.startswith(prompt or ""), proc.stdout
    if _option(words, "--checkpoint") == "best":
        best = home / words[2] / "checkpoints" / "best"
        assert best.is_symlink() and f"/{best.resolve().name}" in proc.stderr, proc.stderr


def prepares(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    if words[:2] == ["dist-train", "prepare"]:
        assert (home / str(_option(words, "--out")) / "meta.json").is_file()


def tracks(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    backends = next((w for w in words if w.startswith("log.backends=")), None)
    if backends is None:
        return
    run_dir = home / str(_run_dir(words))
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert (run_dir / "mlflow.db").stat().st_size > 0


def reports(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    if words[:2] == ["dist-train", "report"]:
        assert (home / str(_option(words, "--out"))).stat().st_size > 10_000


def exports(words: list[str], proc: subprocess.CompletedProcess[str], home: Path) -> None:
    if words[:2] == ["dist-train", "export"]:
        out = home / str(_option(words, "--out"))
        assert out.exists(), out
        files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
        for f in files:  # for others to read: a serving host, a colleague
            assert f.stat().st_mode & 0o044 == 0o044, (f, oct(f.stat().st_mode))


CHECKS: list[Callable[[list[str], subprocess.CompletedProcess[str], Path], None]] = [
    trains_to_the_end,
    samples,
    prepares,
    tracks,
    reports,
    exports,
]
