"""Every bad input a user can give is one line naming the key, value or path and what would be
valid, exit status 2, no traceback, and nothing in the run directory changed. One table here
(config, command line, data, run directory) and one of bad input around an existing run
(helpers_bad_input.py, run by test_bad_input_run.py), so no case regresses; the README counts
their rows."""

from __future__ import annotations

import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import cli, mount_tmpfs
from helpers import GPT_SHAPE
from helpers_bad_input import RUN_CASES, TINY

Setup = Callable[[Path], list[str]]


def _none(_: Path) -> list[str]:
    return []


def _yaml(text: str) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "bad.yaml").write_text(text)
        return ["--config", str(tmp / "bad.yaml")]

    return setup


def _tokens(train: bytes, meta: bytes | None = None, extra: tuple[str, ...] = ()) -> Setup:
    def setup(tmp: Path) -> list[str]:
        (tmp / "tok").mkdir()
        (tmp / "tok/train.bin").write_bytes(train)
        if meta is not None:
            (tmp / "tok/meta.pkl").write_bytes(meta)
        return ["data.name=tokens", f"data.path={tmp / 'tok'}", *extra]

    return setup


TOKENS = np.arange(10, dtype=np.uint16).repeat(20).tobytes()  # ids 0..9, 400 bytes


def _directory(tmp: Path) -> list[str]:
    (tmp / "adir").mkdir()
    return [f"data.path={tmp / 'adir'}"]


def _run_dir_is_a_file(tmp: Path) -> list[str]:
    (tmp / "file").write_text("x")
    return [f"train.run_dir={tmp / 'file'}"]


def _read_only(tmp: Path) -> list[str]:
    ro = tmp / "ro"
    mount_tmpfs(ro, "ro,size=1m", "a read-only filesystem")
    return [f"train.run_dir={ro / 'run'}"]


# (id, extra args, setup, the line's start after "error: ")
CASES: list[tuple[str, list[str], Setup, str]] = [
    ("unknown key", ["model.n_layers=2"], _none, "model.n_layers="),
    ("wrong type", ["optim.lr=fast"], _none, "optim.lr="),
    ("negative lr", ["optim.lr=-1"], _none, "optim.lr=-1.0: must be > 0"),
    ("zero timeout", ["parallel.timeout_s=0"], _none, "parallel.timeout_s=0: must be > 0"),
    ("bad choice", ["model.name=llama"], _none, "model.name='llama': expected one of"),
    ("nonfinite choice", ["train.on_nonfinite=maybe"], _none, "train.on_nonfinite="),
    ("no data file", ["data.path=/nonexistent/c.txt"], _none, "data.path='/nonexistent/c.txt'"),
    ("data.path is a directory", [], _directory, "data.path="),
    (
        "batch does not split",
        ["train.global_batch_size=9", "--nproc", "2"],
        _none,
        "train.global_batch_size=9",
    ),
    ("too many workers", ["--nproc", "999"], _none, "--nproc=999"),
    ("zero workers", ["--nproc", "0"], _none, "--nproc=0: must be >= 1"),
    ("unknown flag", ["--nprocs", "2"], _none, "unrecognized arguments: --nprocs"),
    (
        "bad rendezvous port",
        ["--nnodes", "2", "--rdzv-endpoint", "h0:99999"],
        _none,
        "--rdzv-endpoint='h0:99999'",
    ),
    ("unimportable model", ["model._target_=not_a_module.Net"], _none, "model._target_="),
    (
        "model constructor raises",
        ["model._target_=user_plugins.Exploding"],
        _none,
        "model._target_='user_plugins.Exploding': Exploding() raised ValueError: width must be even",
    ),
    (
        "dataset without split=",
        ["data._target_=user_plugins.TorchvisionStyle"],
        _none,
        "data._target_='user_plugins.TorchvisionStyle': user_plugins.TorchvisionStyle(split='train') "
        "does not fit its signature",
    ),
    ("malformed YAML", [], _yaml("train:\n  max_steps: [1\nmodel: {}\n"), "config='"),
    ("YAML list", [], _yaml("- train\n- model\n"), "config='"),
    ("YAML scalar section", [], _yaml("train: 5\n"), "train=5: in "),
    ("odd train.bin", [], _tokens(b"\x01\x00\x02"), "data.path="),
    ("empty train.bin", [], _tokens(b""), "data.path="),
    ("meta.pkl not a pickle", [], _tokens(TOKENS, b"not a pickle"), "data.path="),
    ("vocab too small (meta)", [], _tokens(TOKENS, pickle.dumps({"vocab_size": 5})), "data.path="),
    (
        "vocab too small (key)",
        [],
        _tokens(TOKENS, None, ("data.vocab_size=4",)),
        "data.vocab_size=4: the tokens hold id 9",
    ),
    ("run_dir is a file", [], _run_dir_is_a_file, "train.run_dir="),
    ("run_dir read-only", [], _read_only, "train.run_dir="),
    (
        "overwrite with resume PATH",
        ["train.overwrite=true", "resume=/x"],
        _none,
        "train.overwrite=True",
    ),
    ("no CUDA", ["train.device=cuda"], _none, "train.device='cuda'"),
    ("metric that does not fit", ["train.metrics=[torch.nn.Linear]"], _none, "train.metrics="),
    (
        "not a metric",
        ["train.metrics=[builtins.object]"],
        _none,
        "train.metrics='builtins.object': object has no update or compute method",
    ),
    (
        "metric update without target",
        ["train.metrics=[user_plugins.UpdateWithoutTarget]"],
        _none,
        "train.metrics='user_plugins.UpdateWithoutTarget': UpdateWithoutTarget.update does not "
        "take 2 argument(s)",
    ),
    (
        "hsdp shard_size does not divide",
        ["parallel.strategy=hsdp", "parallel.shard_size=3", "--nproc", "2"],
        _none,
        "parallel.shard_size=3: must divide the world size 2",
    ),
    (
        "cpu_offload with ddp",
        ["parallel.strategy=ddp", "parallel.cpu_offload=true"],
        _none,
        "parallel.cpu_offload=True: offloads sharded state, so it needs parallel.strategy",
    ),
    (
        "shard_size without hsdp",
        ["parallel.strategy=fsdp", "parallel.shard_size=2"],
        _none,
        "parallel.shard_size=2: is hsdp's shard group size",
    ),
    (
        "activation checkpointing without blocks",
        [
            "parallel.activation_checkpointing=full",
            "data._target_=user_plugins.IndexedSamples",
            "model._target_=user_plugins.TinyRegressor",
            "model.kwargs.in_features=8",
        ],
        _none,
        "parallel.activation_checkpointing='full': TinyRegressor names no blocks",
    ),
    (
        "unreachable tracking server",
        ["log.backends=[jsonl,mlflow]", "log.mlflow_uri=http://127.0.0.1:1"],
        _none,
        "log.",  # log.mlflow_uri, or log.backends where mlflow is not installed
    ),
]
# Found in the parent too, before any worker starts, with 2 workers.
ALSO_TWO = {
    "negative lr",
    "model constructor raises",
    "dataset without split=",
    "odd train.bin",
    "vocab too small (key)",
    "YAML scalar section",
    "not a metric",
    "unreachable tracking server",
    "activation checkpointing without blocks",
}


def command(tmp_path: Path, extra: list[str], args: list[str], nproc: str) -> list[str]:
    config = "configs/quickstart.yaml"
    if args[:1] == ["--config"]:
        config, args = args[1], args[2:]
    words = [*args, *extra]
    if not any(w.startswith("train.run_dir=") for w in words):
        words.append(f"train.run_dir={tmp_path}/run")
    if "--nproc" not in words:
        words += ["--nproc", nproc]
    # The tiny GPT's size and the corpus cap only where a case keeps gpt and text data: another
    # model or data source has no such keys.
    if not any(w.startswith(("model.name=", "model._target_=")) for w in words):
        words = [*GPT_SHAPE, *words]
    if not any(w.startswith(("data.name=", "data._target_=")) for w in words):
        words = ["data.max_chars=50000", *words]
    return ["train", config, *TINY, *words]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "setup", "start", "nproc"),
    [pytest.param(e, s, st, "1", id=name) for name, e, s, st in CASES]
    + [
        pytest.param(e, s, st, "2", id=f"{name} [2 workers]")
        for name, e, s, st in CASES
        if name in ALSO_TWO
    ],
)
def test_bad_input_is_one_line_exit_2(
    extra: list[str], setup: Setup, start: str, nproc: str, tmp_path: Path
) -> None:
    if "train.device=cuda" in extra and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    try:
        argv = command(tmp_path, extra, setup(tmp_path), nproc)
        before = sorted(p.name for p in tmp_path.iterdir())
        proc = cli(*argv)
    finally:
        subprocess.run(["umount", str(tmp_path / "ro")], capture_output=True)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert len(lines) == 1 and lines[0].startswith(f"error: {start}"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory appeared


def test_the_readme_counts_the_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert f"{len(CASES) + len(RUN_CASES)} kinds of bad input" in readme
