"""Shared test helpers: run a function on N gloo ranks, drive the real CLI, keep the env clean."""

from __future__ import annotations

import gc
import os

# Before torch loads: OpenMP threads that finish a parallel region sleep instead of spinning.
# Spinning threads of one test steal the second core from the other xdist worker (measured: two
# concurrent quickstart runs 35 s each with spinning, 14 s with passive waits). Subprocesses
# inherit it. Results are the same either way; only idle CPU use changes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers_fork import fork_main

REPO = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
# The longest test (minutes, one process at a time) starts first: worksteal gives each core its
# half of the list in order, so run last it would leave one core idle at the end of the suite.
LONGEST_FIRST = ("tests/test_readme.py::test_the_readme_in_order",)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.nodeid not in LONGEST_FIRST)  # stable: the rest in order


CLI = Path(sys.executable).parent / "dist-train"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# What a rank process needs loaded: imported once by the fork server, so each rank of each
# test starts in milliseconds instead of re-importing torch (seconds) as `spawn` does.
PRELOAD = ["torch", "torch.distributed.checkpoint", "dist_train.train.build", "helpers"]


def _rank_main(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out: str,
    args: tuple[Any, ...],
    parent: tuple[dict[str, str], str],
) -> None:
    # The fork server was started with the environment and directory of the first test that
    # used it: take this test's instead (monkeypatched variables included).
    environ, cwd = parent
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # two ranks on two cores
    # What torch preloaded is never garbage: each `Trainer.close()`'s gc.collect() need not walk
    # it (about a third of a short run's CPU time otherwise).
    gc.freeze()
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
    """Run `fn(*args)` on `world_size` fresh processes with torchrun's environment variables
    set; return each rank's result. A rank that fails or hangs fails the test (no leftovers)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    parent = (dict(os.environ), os.getcwd())
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        procs = [
            ctx.Process(target=_rank_main, args=(fn, r, world_size, port, out, args, parent))
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
    *args: str,
    cwd: Path | None = None,
    timeout: float = 300.0,
    env: dict[str, str] | None = None,
    real: bool = False,
) -> subprocess.CompletedProcess[str]:
    """`dist-train ARGS` as a user runs it, by default from an empty temporary directory:
    relative run directories land there, and `configs/NAME.yaml` resolves to the shipped config,
    so no test reads or writes the checkout's own `runs/`.

    A single-process command runs in this process (`cli_here`): the same `main()`, streams and
    exit status, without seconds of interpreter and torch start-up per call. One that starts
    processes (`--nproc`/`--nnodes` above 1, a sweep, a benchmark) runs in a forked child
    (`fork_main`), its workers real processes. `real=True` runs the installed script itself."""
    if not real and not _spawns_workers(args):
        return cli_here(*args, cwd=cwd, env=env)
    # The checkout under test first: an editable install of another checkout (or a worktree's
    # main) must not answer for `dist_train` in the subprocess.
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(TESTS)])}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        full_env.pop(var, None)  # inherited ones only: a test may set them on purpose
    full_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="dist_train_cwd_") as scratch:
        if not real:
            return fork_main(list(args), cwd or Path(scratch), full_env, timeout)
        return subprocess.run(
            [str(CLI), *args],
            cwd=cwd or scratch,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
            stdin=subprocess.DEVNULL,
        )


def _spawns_workers(args: tuple[str, ...]) -> bool:
    if any(word.startswith("--max-restarts") for word in args):  # torchrun's agent, even for 1
        return True
    for flag in ("--nproc", "--nnodes"):
        for i, word in enumerate(args):
            value = word.split("=", 1)[1] if word.startswith(flag + "=") else None
            if word == flag and i + 1 < len(args):
                value = args[i + 1]
            if value is not None and value not in ("0", "1"):
                return True
    return args[:1] in (("sweep",), ("bench",))  # these start runs of their own


SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def cli_here(
    *args: str, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `dist_train.cli.main.main(args)` in this process as if it were its own: stdout and
    stderr captured at the file descriptors (what C code and child processes write too), and
    the environment, directory, signal handlers and torch thread count put back afterwards."""
    from dist_train.cli.main import main

    saved_env, saved_cwd, threads = dict(os.environ), os.getcwd(), torch.get_num_threads()
    handlers = {s: signal.getsignal(s) for s in SIGNALS}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "OMP_NUM_THREADS"):
        os.environ.pop(var, None)
    os.environ.update(env or {})
    code: int | str | None = 0
    streams: list[str] = []
    with tempfile.TemporaryDirectory(prefix="dist_train_cwd_") as scratch:
        os.chdir(cwd or scratch)
        try:
            with _captured(streams):
                main(list(args))
        except SystemExit as e:
            code = e.code
        finally:
            os.chdir(saved_cwd)
            os.environ.clear()
            os.environ.update(saved_env)
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            torch.set_num_threads(threads)
            if dist.is_initialized():
                dist.destroy_process_group()
    if isinstance(code, str):  # sys.exit("message") prints it, as the interpreter would
        streams[1] += code + "\n"
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(["dist-train", *args], returncode, *streams)


@contextmanager
def _captured(streams: list[str]) -> Iterator[None]:
    """File descriptors 1 and 2 (and sys.stdout/err over them) into temporary files; their
    text is appended to `streams` on the way out, however the block ends."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds, saved_streams = (os.dup(1), os.dup(2)), (sys.stdout, sys.stderr)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            for f in (out, err):
                f.seek(0)
                streams.append(f.read().decode(errors="replace"))


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
