"""Goodput: a run's wall time split into productive steps, data wait, checkpoint blocking,
evaluation, start-up and restarts, lost work and other, from its metrics files alone; exact on
hand-written records, and adding up to a real run's wall clock; the report's table and bar."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest

from dist_train.experiments.goodput_view import bar, goodput_lines
from dist_train.track.goodput import CATEGORIES, account, goodput_of

from conftest import cli
from helpers import TINY_GPT, train_in_process

RUN = [
    "configs/quickstart.yaml",
    *TINY_GPT,
    "train.max_steps=12",
    "train.global_batch_size=8",
    "log.every_steps=2",
    "train.eval_every=6",
    "checkpoint.every_steps=4",
    "train.sample_tokens=8",
]


def write(path: Path, records: list[dict[str, Any]], junk: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + junk)


def start(step: int, launched: float, loop: float, restart: int = 0) -> dict[str, Any]:
    facts = {"run_dir": "x", "launched_at": launched, "loop_start": loop, "restart": restart}
    return {"step": step, "run_start": facts}


def log(step: int, at: float, loop: float, step_sec: float, wait: float = 0.0, **extra: float):
    return {
        "step": step,
        "loss": 1.0,
        "elapsed_sec": at - loop,
        "step_sec": step_sec,
        "data_wait_sec": wait,
        "wall_time": at,
        **extra,
    }


def evaluation(step: int, at: float, seconds: float) -> dict[str, Any]:
    return {"step": step, "val/loss": 1.0, "eval_sec": seconds, "wall_time": at}


def test_every_category_from_hand_written_records(tmp_path: Path) -> None:
    """Three attempts: A crashes after its checkpoint at step 20 (its step 30 rolled back), B is
    the same command run again 64 s later, C is B's group restarted by torchrun."""
    a, b, c = 1002.0, 1104.0, 1120.0  # the loops' starts; A launched at 1000, B (and C) at 1100
    kept = [
        start(0, 1000.0, a),
        {"step": 5, "loss": 2.0},  # no clock (an older writer): not counted anywhere
        log(10, 1012.0, a, step_sec=1.0, wait=0.1),  # 10 s: 1 s data wait, 9 productive
        evaluation(10, 1014.0, 2.0),
        # 13 s: 0.5 s writing the last record, 1.5 s the save at 10, 2 s its evaluation
        log(20, 1025.0, a, step_sec=1.25, wait=0.05, checkpoint_sec=1.5),
        start(20, 1100.0, b),
        log(30, 1114.0, b, step_sec=1.0),
        start(30, 1100.0, c, restart=1),
        log(40, 1130.0, c, step_sec=1.0),
        evaluation(40, 1131.5, 1.5),
        # after it: 4 s, the final save 2 s, the evaluation 1.5 s, the sample 0.25 s
        {
            "step": 40,
            "run_end": "done",
            "wall_time": 1134.0,
            "checkpoint_sec": 2,
            "sample_sec": 0.25,
        },
    ]
    # A's records after step 20, moved aside by B's resume: 11 s, of which the save at 20
    # (resumed from) is checkpoint time; the evaluation at 25 is lost with its steps
    discarded = [evaluation(25, 1030.0, 3.0), log(30, 1036.0, a, 1.0, checkpoint_sec=1.0)]
    write(tmp_path / "metrics.jsonl", kept, junk='{"step": 41, "lo')  # a line cut by a kill
    write(tmp_path / "metrics.discarded.jsonl", discarded)
    result = account(tmp_path)
    assert result.seconds == pytest.approx(
        {
            "productive": 9 + 8.5 + 10 + 10,
            "data_wait": 1 + 0.5,
            "checkpoint": 1.5 + 1 + 2,
            "evaluation": 2 + 1.5 + 0.25,
            "startup": 2 + 4 + (1120 - 1114),  # C's: from B's last record (its crash)
            "lost": 11 - 1,
            "other": 0.5 + 0.25,
        }
    )
    assert result.wall == pytest.approx(36 + 14 + 20)  # each attempt: its start to its end
    assert result.between == pytest.approx(1100 - 1036)  # nothing ran: not in the wall
    assert (result.attempts, result.restarts) == (3, 1)
    assert result.goodput == pytest.approx(37.5 / 70)
    assert goodput_of(tmp_path) == pytest.approx(37.5 / 70)


def test_runs_without_a_clock_have_no_goodput(tmp_path: Path) -> None:
    write(tmp_path / "metrics.jsonl", [{"step": 0, "run_start": {"run_dir": "x"}}])
    assert account(tmp_path).attempts == 0 and goodput_of(tmp_path) is None
    assert goodput_lines(account(tmp_path))[0].startswith("goodput: not recorded")


def check_parts(result: Any) -> None:
    """No category negative, and they add up to the wall time."""
    assert all(v >= 0 for v in result.seconds.values()), result.seconds
    assert sum(result.seconds.values()) == pytest.approx(result.wall)
    assert 0 < result.goodput <= 1


def test_a_real_run_accounts_for_its_wall_clock(tmp_path: Path) -> None:
    import dist_train.cli.main  # noqa: F401  # imported before the clock starts, as a script's is

    run = tmp_path / "run"
    began = time.time()
    proc = cli("train", *RUN, f"train.run_dir={run}")
    ended = time.time()
    assert proc.returncode == 0, proc.stderr
    result = account(run)
    check_parts(result)
    assert result.attempts == 1 and result.between == 0
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    facts = records[0]["run_start"]
    # From the command's start (main() entered at once) to its last record, run_end: all of the
    # call but closing down.
    assert began <= facts["launched_at"] < began + 0.5
    assert result.wall == pytest.approx(records[-1]["wall_time"] - facts["launched_at"])
    assert ended - began - 2.0 < result.wall <= ended - began, (began, ended, result)
    startup = facts["loop_start"] - facts["launched_at"]
    assert result.seconds["startup"] == pytest.approx(startup) and startup > 0
    evals = sum(r.get("eval_sec", 0) for r in records)  # at 6 and 12, and the closing sample
    assert result.seconds["evaluation"] == pytest.approx(evals + records[-1]["sample_sec"])
    assert evals > 0
    saves = sum(r.get("checkpoint_sec", 0) for r in records)  # at 4, 8 and the end (12)
    assert result.seconds["checkpoint"] == pytest.approx(saves)
    assert "checkpoint_sec" in records[-1] and records[-1]["run_end"] == "done"
    steps = [r for r in records if "step_sec" in r]
    loop = sum(r["step_sec"] for r in steps) * 2  # two steps a record
    assert result.seconds["productive"] < loop and result.seconds["lost"] == 0
    assert f"goodput {result.goodput:.2f}; metrics in" in proc.stdout


def test_a_crash_and_resume_count_lost_work_and_the_restart(tmp_path: Path) -> None:
    overrides = [*RUN[1:], f"train.run_dir={tmp_path}"]
    train_in_process(overrides, stop_at=7)  # logged 2, 4, 6; saved at 4; the crash in step 8
    train_in_process(overrides)  # resumes at 4: the records of 6 are rolled back
    gone = [json.loads(x) for x in (tmp_path / "metrics.discarded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in gone] == [6, 6]  # the log record and the evaluation at 6
    result = account(tmp_path)
    check_parts(result)
    assert (result.attempts, result.restarts) == (2, 0) and result.between > 0
    # The rolled-back interval (steps 5 and 6), its save at 4 aside (the one resumed), is lost:
    # as the loop timed it (step_sec) and as the clock of the records does, within the writing.
    (logged,) = [r for r in gone if "step_sec" in r]
    assert result.seconds["lost"] == pytest.approx(
        logged["step_sec"] * 2 - logged["checkpoint_sec"], abs=0.05
    )
    assert result.seconds["lost"] > 0
    starts = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    second = [r["run_start"] for r in starts if "run_start" in r][1]
    assert result.seconds["startup"] > second["loop_start"] - second["launched_at"] > 0


def test_report_prints_the_table_and_bars(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert cli("train", *RUN, f"train.run_dir={run}").returncode == 0
    proc = cli("report", str(run), "--out", str(tmp_path / "r.png"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    result = account(run)
    assert lines[0].startswith(f"goodput {result.goodput:.2f}: productive steps over ")
    assert lines[0].endswith("of wall time, 1 attempt")
    rows = {line[:22].strip(): line[22:].split() for line in lines[2 : 2 + len(CATEGORIES)]}
    assert list(rows) == list(CATEGORIES.values())
    for key, label in CATEGORIES.items():
        seconds, share, drawn = rows[label]
        assert float(seconds) == pytest.approx(result.seconds[key], abs=0.006)
        assert float(share.rstrip("%")) == pytest.approx(
            100 * result.seconds[key] / result.wall, abs=0.06
        )
        assert drawn == bar(result.seconds[key] / result.wall)
    assert sum(float(share.rstrip("%")) for _, share, _ in rows.values()) == pytest.approx(
        100, abs=0.5
    )
    assert re.fullmatch(r"wrote .*r\.png: 1 run\(s\), panels: .*", lines[-1])


def test_bar_rounds_to_whole_characters() -> None:
    assert bar(0.0, 10) == "[..........]" and bar(1.0, 10) == "[##########]"
    assert bar(0.26, 10) == "[###.......]" and bar(1.5, 4) == "[####]"
