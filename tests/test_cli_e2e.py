"""The real CLI in subprocesses: one process, --nproc 2, plain torchrun, check, bad input,
Ctrl-C and a crashing worker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import CLI, TESTS, cli, leftover_processes, wait_for_metrics
from helpers import TINY_GPT, torch_log_lines

FIELDS = {"step", "loss", "lr", "grad_norm", "samples_per_sec", "tokens_per_sec", "elapsed_sec"}
FIELDS |= {"step_sec", "data_wait_sec", "wall_time"}  # and checkpoint_sec after a save
RUN = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "train.max_steps=40",
    "log.every_steps=10",
    "train.eval_every=20",
    "train.sample_tokens=40",
    "train.global_batch_size=8",
]


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "loss" in r]


def assert_trained(proc: subprocess.CompletedProcess[str], run_dir: Path) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = train_records(run_dir)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert all(set(r) - {"checkpoint_sec"} == FIELDS for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    vals = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if "val/loss" in json.loads(line)
    ]
    assert [v["step"] for v in vals] == [20, 40]
    assert (run_dir / "config.yaml").is_file()
    assert "--- sample (40 tokens) ---" in proc.stdout and "done: 40 steps" in proc.stdout
    return records


@pytest.mark.slow
def test_one_process_and_two_workers_train_the_same(tmp_path: Path) -> None:
    one = assert_trained(cli("train", *RUN, f"train.run_dir={tmp_path}/one"), tmp_path / "one")
    temp = tmp_path / "tmpdir"  # the system temp directory, as the launcher sees it
    temp.mkdir()
    proc = cli(
        "train", *RUN, "--nproc", "2", f"train.run_dir={tmp_path}/two", env={"TMPDIR": str(temp)}
    )
    two = assert_trained(proc, tmp_path / "two")
    assert "2 workers" in proc.stdout
    # torchrun's agent keeps its folders in the run directory and a healthy launch leaves none
    assert not list(temp.glob("torchelastic_*")) and not (tmp_path / "two/logs").exists()
    for a, b in zip(one, two, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)


@pytest.mark.slow
def test_plain_torchrun_and_python_m(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        env.pop(var, None)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "-m",
        "dist_train",
        "train",
        *RUN,
        f"train.run_dir={tmp_path}/tr",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert_trained(proc, tmp_path / "tr")
    proc = subprocess.run(
        [sys.executable, "-m", "dist_train", "check", *RUN],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 0 and "world_size: 1" in proc.stdout


@pytest.mark.slow
def test_check_prints_config_and_plan() -> None:
    proc = cli("check", "configs/quickstart.yaml", "--nproc", "2", "train.micro_batch_size=4")
    assert proc.returncode == 0, proc.stderr
    assert "global_batch_size: 16" in proc.stdout  # the resolved config
    assert "world_size: 2 (gloo on cpu, strategy ddp)" in proc.stdout
    assert "= micro_batch_size 4 x accumulation_steps 2 x world_size 2" in proc.stdout
    assert "parameters: " in proc.stdout


BAD_INPUT = [
    (["model.n_layers=2"], "model.n_layers"),
    (["optim.lr=fast"], "optim.lr"),
    (["data.path=/nonexistent/corpus.txt"], "data.path"),
    (["train.global_batch_size=9", "--nproc", "2"], "train.global_batch_size"),
    (["--nproc", "999"], "--nproc"),
    (["model.name=llama"], "model.name"),
    (["model._target_=not_a_module.Net"], "model._target_"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "key"), BAD_INPUT, ids=[k for _, k in BAD_INPUT])
def test_bad_input_is_one_line_exit_2(args: list[str], key: str, tmp_path: Path) -> None:
    proc = cli("train", "configs/quickstart.yaml", f"train.run_dir={tmp_path}/run", *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}="), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run").exists()  # nothing started, nothing written


def start_endless_two_workers(run_dir: Path) -> subprocess.Popen[str]:
    """`--nproc 2` logging every step until stopped, in its own session (a terminal's group)."""
    cmd = [
        str(CLI),
        "train",
        *RUN,
        "--nproc",
        "2",
        "train.max_steps=100000",
        "log.every_steps=1",
        f"train.run_dir={run_dir}",
    ]
    return subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.slow
def test_ctrl_c_stops_all_workers(tmp_path: Path) -> None:
    run_dir = tmp_path / "interrupted"
    proc = start_endless_two_workers(run_dir)
    try:
        wait_for_metrics(run_dir, proc)
        assert len(leftover_processes(str(run_dir))) >= 3  # the agent and two workers
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert "Traceback" not in err
    time.sleep(1)
    assert leftover_processes(str(run_dir)) == []


@pytest.mark.slow
def test_crashed_worker_stops_the_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    proc = cli(
        "train",
        "configs/mlp_synthetic.yaml",
        "--nproc",
        "2",
        "model._target_=user_plugins.CrashOnRankOne",
        "model.kwargs.in_features=32",
        "data.task=regression",
        "train.max_steps=50",
        f"train.run_dir={run_dir}",
        timeout=120,
    )
    assert proc.returncode == 1
    assert "simulated worker crash" in proc.stderr
    assert torch_log_lines(proc.stderr) == []  # torchrun's agent says nothing; we say it once
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: worker rank 1 failed with exit code 1")
    )
    assert leftover_processes(str(run_dir)) == []


@pytest.mark.slow
def test_readme_end_to_end_bpe_two_workers_loading_workers_sample(tmp_path: Path) -> None:
    """The README's three commands (Preparing data), on a small corpus and a tiny model."""
    words = ["the king", "my lord", "good night", "sweet prince", "to be", "or not"]
    lines = [f"{words[i % 6]} and {words[(i * 7) % 6]}, {i}." for i in range(3000)]
    (tmp_path / "input.txt").write_text("\n".join(lines) + "\n")
    data = tmp_path / "data"
    prep = cli(
        "prepare",
        "input.txt",
        "--out",
        str(data),
        "--tokenizer",
        "bpe",
        "--vocab-size",
        "300",
        cwd=tmp_path,
    )
    assert prep.returncode == 0, prep.stderr
    run_dir = tmp_path / "run"
    tiny = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16"]
    train = cli(
        "train",
        "gpt_char",
        "data.name=tokens",
        f"data.path={data}",
        "data.num_workers=2",
        *tiny,
        "train.max_steps=4",
        "train.global_batch_size=8",
        "train.micro_batch_size=0",
        "train.eval_every=2",
        "train.sample_tokens=8",
        "log.progress=never",
        f"train.run_dir={run_dir}",
        "--nproc",
        "2",
        cwd=tmp_path,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    assert "--- sample (8 tokens) ---" in train.stdout and "done: 4 steps" in train.stdout
    sample = cli("sample", str(run_dir), "--prompt", "the king", "--tokens", "12", cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("the king")
    assert sample.stderr.strip() == f"12 tokens from {run_dir}/checkpoints/step_0000004"
    assert leftover_processes(str(run_dir)) == []
