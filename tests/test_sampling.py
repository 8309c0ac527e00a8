"""`dist-train sample` and the end-of-run sample: one function, the requested number of
tokens, from the latest or the best checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cli
from helpers import TINY_GPT, train_in_process


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("sample") / "run"
    args = ["train.max_steps=4", "train.eval_every=2", "checkpoint.best.metric=val/loss"]
    train_in_process([*TINY_GPT, *args, f"train.run_dir={run}"])
    return run


@pytest.mark.slow
def test_sample_gives_the_requested_tokens_and_is_seeded(run_dir: Path) -> None:
    first = cli("sample", str(run_dir), "--prompt", "def ", "--tokens", "25", "--seed", "3")
    assert first.returncode == 0, first.stderr
    text = first.stdout[:-1]  # print's newline
    assert text.startswith("def ") and len(text) == len("def ") + 25  # characters are tokens
    assert first.stderr.strip() == f"25 tokens from {run_dir}/checkpoints/step_0000004"
    again = cli("sample", str(run_dir), "--prompt", "def ", "--tokens", "25", "--seed", "3")
    assert again.stdout == first.stdout
    best = cli("sample", str(run_dir), "--checkpoint", "best", "--tokens", "3")
    assert best.returncode == 0 and "checkpoints/step_000000" in best.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["--tokens", "0"], "error: --tokens=0: must be >= 1"),
        (["--checkpoint", "nowhere"], "error: --checkpoint='nowhere': no such checkpoint"),
    ],
)
def test_sample_bad_input_is_one_line(run_dir: Path, args: list[str], start: str) -> None:
    out = cli("sample", str(run_dir), *args)
    assert out.returncode == 2 and out.stderr.startswith(start), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_sample_needs_a_run_directory(tmp_path: Path) -> None:
    out = cli("sample", str(tmp_path))
    assert out.returncode == 2
    assert "holds no config.yaml: not a dist-train run" in out.stderr
