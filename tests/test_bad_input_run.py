"""Bad input around an existing run (export, resume, ownership): each case of RUN_CASES
(helpers_bad_input.py) is one line naming what is wrong, exit status 2, no traceback, and
nothing in the copied run directory changed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import cli
from helpers_bad_input import RUN_CASES, TINY


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    proc = cli(
        "train",
        "configs/quickstart.yaml",
        *TINY,
        "train.max_steps=4",
        "checkpoint.every_steps=2",
        f"train.run_dir={run}",
    )
    assert proc.returncode == 0, proc.stderr
    return run


@pytest.mark.slow
@pytest.mark.parametrize(
    ("damage", "words", "start"), [pytest.param(d, w, s, id=n) for n, d, w, s in RUN_CASES]
)
def test_bad_input_around_a_run_is_one_line_exit_2(
    damage: Callable[[Path], None], words: list[str], start: str, trained: Path, tmp_path: Path
) -> None:
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained, run)
    damage(run)
    before = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")}
    fill = {"run": str(run), "tmp": str(tmp_path), "cfg": "configs/quickstart.yaml"}
    argv = [w.format(**fill) for w in words]
    if argv[0] == "train":  # the case's own words come last, so they win
        argv = [*argv[:2], *TINY, f"train.run_dir={run}", *argv[2:]]
    proc = cli(*argv)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in run.rglob("*")} == before
    assert not (tmp_path / "m.safetensors").exists()
