"""The start of a run: a summary before the first step on rank 0 (console, a `run_start` record in
metrics.jsonl), an `init_from` line, transformers heard once under several workers, and no
traceback when the reader of stdout goes away."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from dist_train.config.load import load_config
from dist_train.data.build import build_data
from dist_train.models.registry import build_model
from dist_train.train.summary import init_weights

from conftest import CLI, REPO, TESTS, cli
from helpers import TINY_GPT, TINY_TEXT

QUICK = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "train.max_steps=4",
    "log.every_steps=2",
    "train.eval_every=0",
    "train.sample_tokens=0",
    "checkpoint.every_steps=2",
]
SUMMARY = ["run", "model", "data", "batch", "steps", "parallel", "checkpoints", "metrics"]


def summary_block(stdout: str) -> list[str]:
    """The lines between the launch line and the first metrics line."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("dist-train: "))
    end = next(i for i, line in enumerate(lines) if line.startswith("step "))
    return lines[start + 1 : end]


def run_start_records(run_dir: Path) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "run_start" in r]


def test_quickstart_says_what_it_runs_before_the_first_step(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = cli("train", *QUICK, f"train.run_dir={run}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    block = summary_block(proc.stdout)
    assert [line.split(":")[0] for line in block] == SUMMARY, proc.stdout
    assert len(block) <= 20 and all(len(line) <= 100 for line in block), block
    text = "\n".join(block)
    assert f"run: {run} (fresh start)" in text
    assert "model: GPT, " in text and "(all trainable)" in text
    assert "batch: 16 per step, 512 tokens = 1 worker x 16 micro-batch x 1 accumulation" in text
    assert "parallel: none, precision fp32, on 1 x cpu, gloo" in text
    assert "checkpoints: every 2 steps, best by val/loss (min), keep last 2" in text
    ((step, facts),) = [(r["step"], r["run_start"]) for r in run_start_records(run)]
    assert step == 0 and facts["world_size"] == 1 and facts["tokens_per_step"] == 16 * 32
    assert facts["max_steps"] == 4 and facts["resumed_from"] is None
    assert facts["epochs"] == pytest.approx(4 * 16 / facts["train_samples"])
    # A resume says where it starts; its record joins the first, at the step it resumes at.
    again = cli("train", *QUICK, "train.max_steps=6", f"train.run_dir={run}", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    resumed = f"run: {run} (resumed at step 4 from {run / 'checkpoints' / 'step_0000004'})"
    assert resumed in summary_block(again.stdout)
    assert [r["step"] for r in run_start_records(run)] == [0, 4]


def test_init_from_says_what_it_loaded_and_what_is_new(tmp_path: Path) -> None:
    hf = pytest.importorskip("transformers", reason="the hf extra is not installed")
    config = hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=128)
    hf.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    overrides = [
        *TINY_TEXT,
        "model._target_=transformers.GPT2ForSequenceClassification",
        f"model.init_from={tmp_path / 'lm'}",
    ]
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, build_data(cfg).spec)
    line = init_weights(model, cfg, None)
    total = len(model.state_dict())
    assert line == (  # the LM's tied head is not in the folder: nothing unused
        f"{total - 1} of {total} tensors from {tmp_path / 'lm'} (save_pretrained folder); "
        "newly initialised: score.weight"
    )
    assert init_weights(model, cfg, tmp_path) is None  # a resume: the checkpoint's weights


@pytest.mark.slow
@pytest.mark.distributed
def test_two_fsdp_workers_of_a_transformers_model_speak_once(tmp_path: Path) -> None:
    """--nproc 2, FSDP, GPT-2 from a save_pretrained folder whose special tokens lie outside
    its vocabulary (transformers warns about each): one summary with the init_from line, and
    each of transformers' warnings and loading bars at most once."""
    hf = pytest.importorskip("transformers", reason="the hf extra is not installed")
    config = hf.GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=128)
    hf.GPT2LMHeadModel(config).save_pretrained(tmp_path / "lm")
    run = tmp_path / "run"
    proc = cli(
        "train",
        "configs/quickstart.yaml",
        "--nproc",
        "2",
        *TINY_TEXT,
        "model._target_=transformers.GPT2LMHeadModel",
        f"model.init_from={tmp_path / 'lm'}",
        "parallel.strategy=fsdp",
        "train.max_steps=2",
        "train.global_batch_size=4",
        "log.every_steps=1",
        "train.eval_every=0",
        "train.sample_tokens=0",
        "checkpoint.every_steps=0",
        f"train.run_dir={run}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    block = summary_block(proc.stdout)
    assert [line.split(":")[0] for line in block] == [*SUMMARY[:2], "init_from", *SUMMARY[2:]]
    text = "\n".join(block)
    assert (
        "model: GPT2LMHeadModel, " in text and "parallel: fsdp (2 shards), precision fp32" in text
    )
    assert "batch: 4 per step, 128 tokens = 2 workers x 2 micro-batch x 1 accumulation" in text
    assert f"tensors from {tmp_path / 'lm'} (save_pretrained folder); nothing newly" in text
    assert out.count("run: ") == 1 and len(run_start_records(run)) == 1
    assert out.count("bos_token_id must be") <= 1 and out.count("eos_token_id must be") <= 1
    assert out.count("Loading weights: 100%") <= 1, out  # one bar (its redraws share a line)


def test_a_closed_stdout_ends_quietly(tmp_path: Path) -> None:
    """`dist-train check CFG | head -3`: the reader went away before the output came."""
    env = {"PYTHONPATH": f"{REPO}:{TESTS}", "PATH": str(CLI.parent)}
    proc = subprocess.Popen(
        [str(CLI), "check", "configs/quickstart.yaml"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # as `head` exits: every write now fails with EPIPE
    _, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, 141) and err == "", err
