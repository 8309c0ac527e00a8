"""A non-editable `pip install .` into a fresh venv: the wheel holds every module and the
shipped configs, and the README's commands run from another directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import REPO

PIP = [sys.executable, "-m", "pip"]
SOURCE_FILES = {str(p.relative_to(REPO)) for p in (REPO / "dist_train").rglob("*.py")}


def run(cmd: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("PYTHONPATH", "RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")
    }
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def install_into_fresh_venv(tmp_path: Path, venv: Path) -> Path:
    """`pip install .` (not editable) into a new venv at `venv`; returns its site-packages."""
    # No pip of its own (seconds to install): this environment's pip installs into it.
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    # The dependencies (torch ...) come from this test environment's site-packages through a
    # .pth line, so no multi-GB download; dist_train itself is built and installed for real.
    # Paths listed in a .pth file are added as plain folders: this environment's editable
    # finder for dist_train is not activated in the fresh venv.
    fresh_site = Path(
        run(
            [
                str(venv / "bin/python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            tmp_path,
        ).stdout.strip()
    )
    (fresh_site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(
        [*PIP, "--python", str(venv / "bin/python"), "install", "--quiet", "--no-deps", str(REPO)],
        tmp_path,
    )
    return fresh_site


@pytest.mark.slow
def test_non_editable_install_runs_from_another_directory(tmp_path: Path) -> None:
    venv, work = tmp_path / "venv", tmp_path / "elsewhere"
    work.mkdir()
    fresh_site = install_into_fresh_venv(tmp_path, venv)

    where = run(
        [str(venv / "bin/python"), "-c", "import dist_train; print(dist_train.__file__)"], work
    ).stdout.strip()
    installed = Path(where).parent
    assert installed.is_relative_to(fresh_site), where  # not the checkout
    wheel_files = {f"dist_train/{p.relative_to(installed)}" for p in installed.rglob("*.py")}
    assert wheel_files == SOURCE_FILES  # every subpackage is listed in pyproject.toml
    shipped = {p.name for p in (installed / "configs").glob("*.yaml")}
    assert shipped == {p.name for p in (REPO / "configs").glob("*.yaml")}

    exe = str(venv / "bin/dist-train")
    proc = run(
        [
            exe,
            "train",
            "configs/quickstart.yaml",
            "train.max_steps=20",
            "log.every_steps=10",
            "train.eval_every=0",
            "train.eval_batches=1",
            "train.sample_tokens=20",
            "data.max_chars=200000",
            "log.progress=never",
        ],
        work,
    )
    assert "done: 20 steps" in proc.stdout
    records = [
        json.loads(x) for x in (work / "runs/quickstart/metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "loss" in r] == [10, 20]
    proc = run([exe, "bench", "overhead", "--steps", "2", "--repeats", "1"], work)
    assert "step time dist_train/raw_torch:" in proc.stdout
    assert (work / "bench_results/overhead_nproc1_fp32.json").is_file()
