"""Exit statuses that tell a scheduler what a retry can do (README, "Exit statuses"): a lost
peer or a killed worker is retryable (138), not the user's input (2); a preemption that reached
another node is no error; the waiting rank names a dead peer's phase only when its report is
current, and a peer lost during a save as that."""

from __future__ import annotations

import json
import os
import signal
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.errors import (
    EXIT_BUG,
    EXIT_INFRA,
    EXIT_INPUT,
    EXIT_PREEMPTED,
    DistTrainError,
    InfraError,
)
from dist_train.launch import watch
from dist_train.launch.env import DistEnv
from dist_train.launch.launcher import _worker_failed, exit_status, how_it_ended

from conftest import cli, leftover_processes


def test_exit_statuses_are_distinct_and_fit_the_schedulers() -> None:
    assert len({0, EXIT_BUG, EXIT_INPUT, EXIT_INFRA, EXIT_PREEMPTED}) == 5
    assert (EXIT_BUG, EXIT_INPUT, EXIT_PREEMPTED) == (1, 2, 143)
    assert EXIT_INFRA >= 128
    # not what a kill of one of our processes produces: 128 + a signal we do not handle
    handled = {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT}
    assert EXIT_INFRA - 128 in {int(s) for s in handled}


@pytest.mark.parametrize(
    ("worker", "launcher"),
    [
        (-int(signal.SIGKILL), EXIT_INFRA),  # the out-of-memory killer
        (-int(signal.SIGSEGV), EXIT_INFRA),  # a signal of any kind: the node, not the input
        (EXIT_INFRA, EXIT_INFRA),  # it lost a peer and said which
        (EXIT_INPUT, EXIT_INPUT),
        (EXIT_BUG, EXIT_BUG),
        (EXIT_PREEMPTED, EXIT_PREEMPTED),
    ],
)
def test_a_worker_status_becomes_the_launcher_status(worker: int, launcher: int) -> None:
    assert exit_status(worker) == launcher


def child_failed(codes: dict[int, int]) -> Any:
    """torchrun's ChildFailedError for these ranks' exit codes, the first rank failing first."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failures = {}
    for order, (rank, code) in enumerate(codes.items()):
        failures[rank] = ProcessFailure(rank, 1000 + rank, code, "")
        failures[rank].timestamp = order
    return ChildFailedError("dist_train", failures)


def test_a_killed_worker_ends_the_launch_as_retryable(capsys: pytest.CaptureFixture[str]) -> None:
    assert _worker_failed(child_failed({1: -int(signal.SIGKILL), 0: EXIT_INFRA})) == EXIT_INFRA
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: worker rank 1 was killed by SIGKILL")
    assert line.endswith("exit status 138 (a retry can fix it)")
    assert how_it_ended(EXIT_INFRA) == "lost a peer, its node or the network (the error above)"


def test_workers_stopped_by_a_signal_elsewhere_are_no_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A PyTorchJob whose other pod was preempted: every worker here saved and exited 143."""
    # the first to exit; the agent stops the others, which were saving the same step
    codes = {1: EXIT_PREEMPTED, 0: -int(signal.SIGTERM)}
    assert _worker_failed(child_failed(codes)) == EXIT_PREEMPTED
    (line,) = capsys.readouterr().err.splitlines()
    assert not line.startswith("error")
    assert "stopped on a stop signal that reached another node or a worker" in line
    assert "run the same command to continue" in line


def test_the_cli_exits_with_the_error_s_own_status(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from dist_train.cli import check
    from dist_train.cli.main import main

    def lost(_: object) -> int:
        raise InfraError("rank 1 stopped reporting")

    monkeypatch.setattr(check, "cmd_check", lost)
    monkeypatch.delenv("TORCH_CPP_LOG_LEVEL", raising=False)
    with pytest.raises(SystemExit) as ended:
        main(["check", "quickstart"])
    assert ended.value.code == EXIT_INFRA
    assert capsys.readouterr().err == "error: rank 1 stopped reporting\n"
    # torch's C++ log (c10d's retries with their stack dumps) stays off, workers included
    assert os.environ["TORCH_CPP_LOG_LEVEL"] == "FATAL"


class FakeStore:
    """The part of torchrun's store the watch uses, in memory."""

    def __init__(self, posted: dict[str, str]) -> None:
        self.data = dict(posted)

    def set(self, key: str, value: str) -> None:
        self.data[key] = value

    def check(self, keys: list[str]) -> bool:
        return all(k in self.data for k in keys)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return [self.data[k].encode() for k in keys]


def explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, error: BaseException, peer_step: int
) -> BaseException:
    """Rank 0 of 2, in the gradient all-reduce of step 26, explains `error`; rank 1 is silent,
    its last report from (0-based) step `peer_step`."""
    report = watch.Report(peer_step, 0, "forward/backward", 0.0, seq=3)
    store = FakeStore({"1": json.dumps(asdict(report))})
    monkeypatch.setattr(watch, "_store", lambda timeout_s: store)
    monkeypatch.setattr(watch, "SILENT_S", 0.01)
    env = DistEnv(0, 0, 2, 2, torch.device("cpu"), "gloo")
    w = watch.Watch(env)
    try:
        w.progress.enter("forward/backward", 25)
        return w.explain(error, 600, tmp_path)
    finally:
        w.close()


GLOO_LOST = "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"


def test_a_dead_peer_s_stale_report_is_not_named_as_its_phase(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Reports come twice a second, many steps apart on a fast run: rank 1 took part in step
    25's all-reduce, so its report from step 15 is not where it died."""
    error = explained(monkeypatch, tmp_path, RuntimeError(GLOO_LOST), peer_step=14)
    assert isinstance(error, InfraError) and error.exit_code == EXIT_INFRA
    text = str(error)
    assert text.startswith("rank 1 stopped reporting (its process, its node or the network")
    assert "where it was is unknown: it got past step 25 with this rank, and its last " in text
    assert "report, from step 15, is older" in text
    assert "it was last" not in text and "at step 15 (for" not in text


def test_a_dead_peer_s_current_report_names_its_phase(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    error = explained(monkeypatch, tmp_path, RuntimeError(GLOO_LOST), peer_step=25)
    assert isinstance(error, InfraError)
    assert "it was last in forward/backward (the gradient all-reduce) at step 26" in str(error)


def test_a_peer_lost_during_a_save_is_named_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """What the save reports when its collectives lose a peer is no disk error."""
    save = DistTrainError(
        f"checkpoint: cannot write {tmp_path}/checkpoints/.tmp_step_0000026: Connection reset "
        "by peer; the partial save was removed and there is no earlier checkpoint"
    )
    error = explained(monkeypatch, tmp_path, save, peer_step=25)
    assert isinstance(error, InfraError)
    assert "cannot write" not in str(error)
    assert "a peer was lost during the checkpoint save, which did not complete" in str(error)
    # a save that failed on its own (the disk) stays what it was
    full = DistTrainError("checkpoint: cannot write x: No space left on device")
    assert explained(monkeypatch, tmp_path, full, peer_step=25) is full


@pytest.mark.slow
def test_a_peer_killed_during_a_save_is_a_retryable_peer_loss(tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed inside the save at step 4: rank 0 names a peer lost during the save
    (not "cannot write"), and the launch exits 138, no C++ stack dump on the way."""
    run_dir = tmp_path / "run"
    proc = cli(
        "train",
        "configs/mlp_synthetic.yaml",
        "--nproc",
        "2",
        "data._target_=user_plugins.LineDataset",
        "model._target_=user_plugins.DieInSaveOnRankOne",
        "model.kwargs.in_features=8",
        "checkpoint.every_steps=4",
        "train.max_steps=8",
        "train.eval_every=0",
        f"train.run_dir={run_dir}",
        timeout=240,
    )
    assert proc.returncode == EXIT_INFRA, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
    assert "a peer was lost during the checkpoint save" in proc.stderr, proc.stderr[-3000:]
    assert "while rank 0 waited saving a checkpoint at step 4" in proc.stderr
    assert not any("cannot write" in x for x in errors), errors
    assert errors[-1].startswith("error: worker rank 1 was killed by SIGKILL")
    assert "frame #" not in proc.stderr and "[c10d]" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert leftover_processes(str(run_dir)) == []


def test_the_readme_table_is_the_code_s() -> None:
    from dist_train.errors import EXIT_UNSAVED, RETRYABLE

    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    table = readme.split("### Exit statuses")[1].split("\n\n")[2]
    rows = {int(line.split("|")[1]): line for line in table.splitlines()[2:]}
    assert set(rows) == {0, EXIT_BUG, EXIT_INPUT, EXIT_INFRA, EXIT_PREEMPTED, EXIT_UNSAVED}
    retried = {code for code, row in rows.items() if row.split("|")[3].strip() == "yes"}
    assert retried == set(RETRYABLE)


@pytest.mark.slow
def test_a_stop_signal_to_one_worker_only_is_a_preemption_not_an_error(tmp_path: Path) -> None:
    """As a PyTorchJob pod sees its peer pod's preemption: the signal reaches a worker, not this
    launcher. Every worker saves and exits 143; the launcher says so, as no error."""
    from helpers_scale_out import losses, start

    run_dir = tmp_path / "run"
    proc = start(run_dir, "--nproc", "2")
    try:
        while not (run_dir / "metrics.jsonl").exists() or len(losses(run_dir)) < 3:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
        workers = [pid for pid in leftover_processes(str(run_dir)) if pid != proc.pid]
        (rank1,) = [p for p in workers if b"\0RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes()]
        os.kill(rank1, signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
    assert [x for x in err.splitlines() if x.startswith("error")] == [], err[-2000:]
    assert "preempted (a stop signal) at step " in err  # rank 0's line: what was saved
    assert "stopped on a stop signal that reached another node or a worker" in err


def test_a_stop_signal_wrapped_by_an_import_still_ends_as_a_stop(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM landing while a dataclass is being defined (torch's imports at start-up) comes
    back from Python as "RuntimeError: Error calling __set_name__": still status 143, one line."""
    from dist_train.cli import main as cli_main
    from dist_train.launch.signals import Terminated

    class Field:
        def __set_name__(self, owner: type, name: str) -> None:
            raise Terminated(signal.SIGTERM)

    def slow_import() -> None:
        type("RunResult", (), {"return_values": Field()})

    monkeypatch.setattr(cli_main, "check_torch_version", slow_import)
    with pytest.raises(SystemExit) as stopped:
        cli_main.main(["check", "configs/quickstart.yaml"])
    assert stopped.value.code == EXIT_PREEMPTED
    assert capsys.readouterr().err.splitlines() == ["terminated (SIGTERM) before training"]
