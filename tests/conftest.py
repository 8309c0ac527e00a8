"""Shared test helpers: run a function on N gloo ranks, drive the real CLI, keep the env clean."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
CLI = Path(sys.executable).parent / "dist-train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, out: str, args: tuple[Any, ...]
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # two ranks on two cores
    try:
        result = fn(*args)
    except BaseException:
        Path(out, f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, Path(out, f"rank{rank}.pt"))


def run_on_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 180.0
) -> list[Any]:
    """Run `fn(*args)` on `world_size` spawned processes with torchrun's environment variables
    set; return each rank's result. A rank that fails or hangs fails the test (no leftovers)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out, args))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        errors = [Path(out, f"error{r}.txt") for r in range(world_size)]
        messages = [e.read_text() for e in errors if e.exists()]
        codes = [p.exitcode for p in procs]
        if messages or any(codes):
            raise AssertionError(f"ranks exited {codes}\n" + "\n".join(messages))
        return [torch.load(Path(out, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def cli(
    *args: str, cwd: Path | None = None, timeout: float = 300.0, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed `dist-train` script, as a user runs it. By default from an empty temporary
    directory: relative run directories land there, and `configs/NAME.yaml` resolves to the
    shipped config, so no test reads or writes the checkout's own `runs/`."""
    # The checkout under test first: an editable install of another checkout (or a worktree's
    # main) must not answer for `dist_train` in the subprocess.
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        full_env.pop(var, None)  # inherited ones only: a test may set them on purpose
    full_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="dist_train_cwd_") as scratch:
        return subprocess.run(
            [str(CLI), *args],
            cwd=cwd or scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )


def mount_tmpfs(path: Path, options: str, why: str) -> None:
    """A small tmpfs at `path` (read-only, or one that fills up), or skip the test saying why:
    it needs root and mount(8). The caller unmounts it (`umount PATH`)."""
    path.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip(f"needs root and mount(8) for {why}")


# What a user's own work in the checkout looks like: no test may create, change or delete it.
GUARDED = ("runs", "bench_results")


def tree_fingerprint(root: Path, names: tuple[str, ...] = GUARDED) -> dict[str, tuple[int, int]]:
    """(mtime, size) of every path under root/NAME: a folder's mtime moves when an entry is
    added or removed, a file's when it is written."""
    found = {}
    for name in names:
        top = root / name
        if top.exists():
            for path in [top, *top.rglob("*")]:
                stat = path.lstat()
                found[str(path.relative_to(root))] = (stat.st_mtime_ns, stat.st_size)
    return found


def fingerprint_changes(
    before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]
) -> list[str]:
    return sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))


@pytest.fixture(autouse=True)
def repo_left_alone() -> Any:
    """Fails any test that touches the checkout's runs/ or bench_results/ (a user's
    `make train` output must survive `make test`, and must not change what a test sees)."""
    before = tree_fingerprint(REPO)
    yield
    changed = fingerprint_changes(before, tree_fingerprint(REPO))
    if changed:
        pytest.fail(
            f"the test changed {', '.join(changed[:5])} in the repository; tests must "
            "write only under tmp_path (set train.run_dir / --out)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def clean_dist_env(monkeypatch: pytest.MonkeyPatch) -> Any:
    """No test sees another's torchrun variables or process group."""
    for var in (
        "RANK",
        "LOCAL_RANK",
        "WORLD_SIZE",
        "LOCAL_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "TORCHELASTIC_RUN_ID",
    ):
        monkeypatch.delenv(var, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class StopTraining(Exception):
    """Raised by a test hook to cut a run short, as a crash or a kill would."""


def train_in_process(
    overrides: list[str], stop_at: int | None = None, config: str | Path | None = None
) -> dict[str, Any]:
    """Train in this process (a rank when RANK etc. are set): losses per step, full weights,
    and what this rank stores locally. `stop_at=N` interrupts the run right after step N;
    `config` is a YAML file under the overrides."""
    from dist_train.config.load import load_config
    from dist_train.launch.env import dist_session, read_env
    from dist_train.parallel.wrap import local_numel, unwrap
    from dist_train.train.build import build_trainer

    cfg = load_config(config, overrides)
    env = read_env(cfg.train.device)
    with dist_session(env, timeout_s=120):
        trainer = build_trainer(cfg, env)
        if stop_at is not None:

            def stop(module: torch.nn.Module, *_: Any) -> None:
                if trainer.state.step == stop_at and module.training:  # not in evaluation
                    raise StopTraining

            unwrap(trainer.model).register_forward_pre_hook(stop)
        try:
            result = trainer.fit()
        except StopTraining:
            trainer.close()
            return {"stopped_at": trainer.state.step}
        except BaseException:
            trainer.close()  # as the CLI does: DDP must go before its process group
            raise
        model = unwrap(trainer.model)
        params = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()
        }
        meshes = {
            p.device_mesh.device_type for p in model.parameters() if hasattr(p, "device_mesh")
        }
        out = {
            "losses": result.losses,
            "val": result.val_losses,
            "val_metrics": result.val_metrics,
            "params": params,
            "local_numel": local_numel(model),
            "numel": sum(p.numel() for p in model.parameters()),
            "devices": {p.device.type for p in model.parameters()},
            "meshes": meshes,
            "wrapper": type(trainer.model).__name__,
            "sample": result.sample,
        }
        trainer.close()
    return out


# Small settings shared by tests that train: seconds, not minutes, on 2 cores. Each model and
# data source has only its own keys, so the parts come apart: TINY_TEXT for any model on 32-token
# windows of a capped text corpus (gpt or a _target_), GPT_SHAPE for the built-in gpt's size.
TINY_RUN = ["train.device=cpu", "train.eval_batches=2", "log.progress=never"]
TINY_TEXT = [*TINY_RUN, "model.block_size=32", "data.max_chars=100000"]
GPT_SHAPE = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32"]
TINY_GPT = [*TINY_TEXT, *GPT_SHAPE]

# Exactness runs: fp32, no dropout, every step logged. SGD is kept on purpose: only SGD exposes a
# gradient summed over ranks instead of averaged (Adam is nearly blind to the scale).
STEPS = 24
EXACT_RUN = [
    *TINY_GPT,
    f"train.max_steps={STEPS}",
    "train.global_batch_size=8",
    "log.every_steps=1",
    "train.eval_every=12",
    "optim.warmup_steps=3",
    "optim.grad_clip=1.0",
    "model.dropout=0.0",
]
OPTIMIZERS = {
    "adamw": ["optim.name=adamw", "optim.lr=1e-3"],
    "sgd": ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9"],
}


def assert_same_training(a: dict[str, Any], b: dict[str, Any], rel: float = 1e-5) -> None:
    """Same per-step losses, validation losses and final weights within `rel`."""
    assert sorted(a["losses"]) == sorted(b["losses"]) and a["losses"]
    for step in a["losses"]:
        assert b["losses"][step] == pytest.approx(a["losses"][step], rel=rel), step
    assert b["val"] == pytest.approx(a["val"], rel=rel)
    for name, tensor in a["params"].items():
        torch.testing.assert_close(b["params"][name], tensor, rtol=rel, atol=1e-6, msg=name)


def leftover_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (a unique run dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_text():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def wait_for_metrics(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").read_text():
            return
        time.sleep(0.2)
    raise AssertionError(f"no metrics before timeout; exit {proc.poll()}")
