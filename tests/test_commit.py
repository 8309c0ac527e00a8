"""A kill at any point of a checkpoint commit or of retention leaves a complete, verified
checkpoint (the old or the new one) that start-up recovery and `resume: auto` find, and the run
trains on; each manifest names its parent, and two runs' checkpoints mixed in one directory are
detected. A kill is a BaseException that nothing cleans up after, raised instead of the Nth
`os.replace` (the rename is not made) or inside the Nth `shutil.rmtree` (after its first file)
while rank 0 commits."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from dist_train.checkpoint import checkpointer as ckpt_module
from dist_train.checkpoint.checksums import damaged_files
from dist_train.checkpoint.commit import put_in_place
from dist_train.checkpoint.files import MANIFEST, read_manifest, resolve_resume
from dist_train.checkpoint.lineage import checkpoint_id
from dist_train.checkpoint.recovery import recover_checkpoints
from dist_train.config.load import load_config
from dist_train.errors import ConfigError

from conftest import REPO, cli
from helpers import train_in_process
from helpers_run_safety import RUN

CONFIG = REPO / "configs/quickstart.yaml"
# Checkpoints at steps 2 and 4; the CLI's words are the same (`dist-train train CONFIG ...`).
BASE = [
    *RUN,
    "data.max_chars=50000",
    "train.sample_tokens=0",
    "train.max_steps=4",
    "checkpoint.every_steps=2",
    "checkpoint.best.metric=''",  # the commits of step folders alone
]


class Killed(BaseException):
    """kill -9 stand-in: not an Exception, so no save-failure clean-up runs after it."""


def ckpt(run: Path, step: int, prefix: str = "") -> Path:
    return run / "checkpoints" / f"{prefix}step_{step:07d}"


def ids(run: Path) -> dict[str, str]:
    """The id of every complete manifest among the checkpoint folders, hidden ones included."""
    found = {}
    for folder in (run / "checkpoints").iterdir():
        if (folder / MANIFEST).is_file():
            found[folder.name] = checkpoint_id(read_manifest(folder))
    return found


def visible_intact(run: Path) -> list[str]:
    """Every visible step folder: a complete checkpoint whose files all verify (else a
    resume=PATH, an export or a later `auto` would meet a half-deleted one)."""
    bad = []
    for folder in sorted((run / "checkpoints").glob("step_*")):
        try:
            if damaged_files(read_manifest(folder), folder):
                bad.append(folder.name)
        except (ConfigError, KeyError):
            bad.append(folder.name)
    return bad


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train_in_process([*BASE, f"train.run_dir={run}"], config=CONFIG)
    return run


@pytest.fixture
def run(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run", symlinks=True)  # checkpoints/best stays a link
    return tmp_path / "run"


def kill_in_commit(monkeypatch: pytest.MonkeyPatch, op: str, nth: int) -> list[str]:
    """While a commit runs, the `nth` call of `op` (replace | rmtree) is a kill. Returns the
    list the kill appends to, so a test sees that it happened."""
    hits: list[str] = []
    real_commit, real = ckpt_module.commit_step, {"replace": os.replace, "rmtree": shutil.rmtree}
    calls = [0]

    def faulty(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] != nth:
            return real[op](path, *args, **kwargs)
        hits.append(str(path))
        if op == "rmtree":  # a deletion cut short: a shard gone, .metadata and manifest not
            min(Path(path).rglob("*.distcp")).unlink()
        raise Killed

    def commit(*args: Any, **kwargs: Any) -> Any:
        with monkeypatch.context() as inside:
            inside.setattr(os if op == "replace" else shutil, op, faulty)
            return real_commit(*args, **kwargs)

    monkeypatch.setattr(ckpt_module, "commit_step", commit)
    return hits


def resave_step4(run: Path, monkeypatch: pytest.MonkeyPatch, op: str, nth: int) -> None:
    """Resume from step 2 with another learning rate (so the new step 4 differs from the old)
    and keep_last=1: the commit of step 4 replaces the old step 4, then retention drops step 2;
    the kill lands at the chosen point of that."""
    hits = kill_in_commit(monkeypatch, op, nth)
    again = [
        *BASE,
        f"train.run_dir={run}",
        f"resume={ckpt(run, 2)}",
        "optim.lr=5e-4",
        "checkpoint.keep_last=1",
    ]
    with pytest.raises(Killed):
        train_in_process(again, config=CONFIG)
    monkeypatch.undo()
    assert hits, f"no {op} call #{nth} in the commit"


# The commit of step 4 over an old step 4, then retention of step 2, call by call:
# replace 1: step_4 -> .old_step_4; replace 2: .tmp_step_4 -> step_4; rmtree 1: .old_step_4;
# replace 3: step_2 -> .del_step_2; rmtree 2: .del_step_2.
POINTS = [("replace", 1), ("replace", 2), ("rmtree", 1), ("replace", 3), ("rmtree", 2)]


@pytest.mark.parametrize(("op", "nth"), POINTS, ids=[f"{op}{n}" for op, n in POINTS])
def test_a_kill_at_any_point_of_a_commit_or_retention_leaves_a_complete_checkpoint(
    run: Path, monkeypatch: pytest.MonkeyPatch, op: str, nth: int
) -> None:
    old4, old2 = ids(run)["step_0000004"], ids(run)["step_0000002"]
    resave_step4(run, monkeypatch, op, nth)
    assert visible_intact(run) == []  # even before recovery: nothing visible is half there
    new = [v for k, v in ids(run).items() if v != old4 and k.endswith("step_0000004")]
    assert len(new) == 1  # the new step 4's manifest was written before any rename
    said: list[str] = []
    recover_checkpoints(run, said.append)
    assert len(said) <= 1  # what was done, in one line
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".")], names  # nothing half-done is left
    assert visible_intact(run) == []
    cfg = load_config(CONFIG, [*BASE, f"train.run_dir={run}", "optim.lr=5e-4"])
    resumed = resolve_resume(cfg)
    assert resumed == ckpt(run, 4)
    assert checkpoint_id(read_manifest(resumed)) == new[0]  # the commit was finished
    assert read_manifest(resumed)["parent"] == {"step": 2, "id": old2}
    more = [*BASE, f"train.run_dir={run}", "optim.lr=5e-4", "train.max_steps=6"]
    assert sorted(train_in_process(more, config=CONFIG)["losses"]) == [5, 6]  # trains on
    assert visible_intact(run) == []


def test_a_cut_commit_whose_new_folder_is_damaged_is_rolled_back(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old4 = ids(run)["step_0000004"]
    resave_step4(run, monkeypatch, "replace", 2)  # old step 4 aside, the new one not in place
    shard = next(ckpt(run, 4, ".tmp_").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-10])  # the new one does not verify
    said: list[str] = []
    recover_checkpoints(run, said.append)
    assert said == [
        "checkpoints: put back step_0000004 (a crash cut the commit that was replacing it); "
        "removed 1 incomplete checkpoint folder(s) left by an interrupted save: .tmp_step_0000004"
    ]
    assert ids(run) == {"step_0000002": ids(run)["step_0000002"], "step_0000004": old4}
    cfg = load_config(CONFIG, [*BASE, f"train.run_dir={run}"])
    assert resolve_resume(cfg) == ckpt(run, 4) and visible_intact(run) == []


def test_a_rename_that_fails_in_a_live_run_puts_the_old_checkpoint_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a kill: the rename into place raises (EIO, EXDEV) and the run goes on to report
    it; the old checkpoint must be back under its name by then, not left aside."""
    final, new = tmp_path / "step_0000004", tmp_path / ".tmp_step_0000004"
    for folder, text in ((final, "old"), (new, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    real = os.replace

    def failing(src: Path, dst: Path) -> None:
        if Path(src) == new:
            raise OSError(5, "Input/output error")
        real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        put_in_place(new, final)
    assert (final / "f").read_text() == "old" and (new / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp_step_0000004", "step_0000004"]


@pytest.mark.slow
def test_the_same_command_finishes_an_interrupted_commit_before_it_resumes(run: Path) -> None:
    """The state a kill between the two renames leaves, made by hand: the old step 4 aside,
    the new one complete in .tmp_step_4. The owner finishes the commit before it decides
    where to resume (a fresh start or step 2 would lose the save)."""
    os.replace(ckpt(run, 4), ckpt(run, 4, ".old_"))
    shutil.copytree(ckpt(run, 4, ".old_"), ckpt(run, 4, ".tmp_"))
    (run / "checkpoints/.del_step_0000001").mkdir()  # and a deletion cut short
    proc = cli("train", str(CONFIG), *BASE, f"train.run_dir={run}", "train.max_steps=6")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (
        "checkpoints: finished the interrupted commit of step_0000004 (its manifest and "
        "checksums verified); finished deleting step_0000001\n" in proc.stdout
    )
    assert f"resumed from {ckpt(run, 4)} at step 4" in proc.stdout
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_0000004",
        "step_0000006",
    ]


# --- parentage ------------------------------------------------------------------------------


def test_each_manifest_names_its_parent(trained: Path) -> None:
    a2, a4 = (read_manifest(ckpt(trained, s)) for s in (2, 4))
    assert a2["parent"] is None and a2["id"] == checkpoint_id(a2)
    assert a4["parent"] == {"step": 2, "id": a2["id"]}  # the run's previous save


def test_a_resume_from_an_older_checkpoint_does_not_let_auto_mix_two_runs(run: Path) -> None:
    """Run A saved 2, 4 and 6; run B resumed from 2 with another learning rate, saved 4 again
    and was killed at step 5. A's step 6 continues A's step 4, which is no longer there:
    `auto` says so instead of continuing A with B's settings; naming either one resumes."""
    a = [*BASE, f"train.run_dir={run}", "train.max_steps=6", "checkpoint.keep_last=3"]
    train_in_process(a, config=CONFIG)
    b = [*a, f"resume={ckpt(run, 2)}", "optim.lr=5e-4"]
    assert train_in_process(b, stop_at=5, config=CONFIG) == {"stopped_at": 5}
    assert read_manifest(ckpt(run, 4))["parent"]["step"] == 2  # B's step 4
    with pytest.raises(ConfigError, match=r"mix two runs: step_0000006 continues a step_0000004"):
        resolve_resume(load_config(CONFIG, a))
    for pick in (4, 6):
        assert resolve_resume(load_config(CONFIG, [*a, f"resume={ckpt(run, pick)}"])) == ckpt(
            run, pick
        )


def test_manifests_without_parent_still_load_and_check(run: Path) -> None:
    """Checkpoints written before parents were recorded: they load, `auto` resumes them, and
    the next save names the loaded one (its id computed from its checksums)."""
    for step in (2, 4):
        path = ckpt(run, step) / MANIFEST
        manifest = json.loads(path.read_text())
        del manifest["parent"], manifest["id"]
        path.write_text(json.dumps(manifest))
    more = [*BASE, f"train.run_dir={run}", "train.max_steps=6"]
    assert sorted(train_in_process(more, config=CONFIG)["losses"]) == [5, 6]
    old4 = read_manifest(ckpt(run, 4))
    assert read_manifest(ckpt(run, 6))["parent"] == {"step": 4, "id": checkpoint_id(old4)}
