"""`dist-train bench checkpoint`: its size checks in the parent, the throttled stream and DCP
write patch behind the "slow disk" rows, the plain-file contenders, and smoke runs with every
row and ratio present, positive and finite. Never a timing assertion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dist_train.bench.harness import BenchArgs
from dist_train.bench.registry import get_benchmark, load_runner
from dist_train.bench.report import format_table
from dist_train.cli.main import build_parser
from dist_train.errors import ConfigError
from dist_train.launch.env import DistEnv

from helpers_bench import CPU1, QUICKSTART, TINY, finite_positive

CKPT_PARAMS = "300000"  # 1.2 MB of state: every phase takes milliseconds
CKPT_ROWS = [
    "dcp save (sync)",
    "dcp async save: blocking",
    "dcp async save: total",
    "raw write+fsync (new file)",
    "raw write+fsync (in place)",
    "torch.save+fsync (new file)",
    "memcopy (clone)",
    "memcopy (into buffer)",
    "dcp load",
    "checksum verify (after a load)",
    "torch.load",
    "torch.load+load_state_dict",
    "raw read",
    "slow dcp save (sync)",
    "slow dcp async save: blocking",
    "slow dcp async save: total",
    "train",
    "train + bg save",
]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "abc"),
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "0"),
        ("DIST_TRAIN_BENCH_CKPT_PARAMS", "1e15"),
        ("DIST_TRAIN_BENCH_CKPT_SLOW_MBPS", "-5"),
    ],
)
def test_checkpoint_sizes_are_checked_in_the_parent(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    bench = get_benchmark("checkpoint")
    assert (bench.nproc, bench.steps) == (1, 1) and callable(load_runner(bench))
    monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["bench", "checkpoint"])
    with pytest.raises(ConfigError) as e:  # 1e15 parameters: more memory than the machine
        args.func(args)
    assert e.value.key == name


def test_checkpoint_state_is_sized_by_parameters() -> None:
    from dist_train.bench.ckpt_io import linear_stack

    assert sum(p.numel() for p in linear_stack(10**8).parameters()) == 24 * 2048**2
    small = linear_stack(300_000)
    assert len(small) == 1 and small[0].weight.shape == (547, 547)


def test_throttled_stream_paces_writes() -> None:
    import io

    from dist_train.bench.ckpt_io import ThrottledStream

    now, slept = [0.0], []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s

    buf = io.BytesIO()
    stream = ThrottledStream(buf, rate=100.0, clock=lambda: now[0], sleep=sleep)
    assert stream.write(b"x" * 50) == 50 and sum(slept) == pytest.approx(0.5)
    now[0] += 2.0  # busy elsewhere: the next 100 bytes were due at 1.5 s already
    stream.write(b"y" * 100)
    assert sum(slept) == pytest.approx(0.5)
    stream.write(memoryview(torch.zeros(100).numpy()))  # counted in bytes (400), not items
    assert sum(slept) == pytest.approx(0.5 + 3.0) and stream.tell() == 550 == stream.written


def test_throttle_patches_dcp_writes_under_its_root_only(tmp_path: Path) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    from dist_train.bench.ckpt_io import ThrottledStream, throttle_dcp_writes

    fs, slow = FileSystem(), tmp_path / "slow"
    slow.mkdir()
    with throttle_dcp_writes(slow, 1e12):
        with fs.create_stream(slow / "a", "wb") as s:
            assert isinstance(s, ThrottledStream)
            s.write(b"abc")
        for path, mode in ((tmp_path / "b", "wb"), (slow / "a", "rb")):
            with fs.create_stream(path, mode) as s:
                assert not isinstance(s, ThrottledStream)
    assert (slow / "a").read_bytes() == b"abc"
    with fs.create_stream(slow / "c", "wb") as s:  # restored on exit
        assert not isinstance(s, ThrottledStream)


def test_plain_files_round_trip_retention_and_split_shares(tmp_path: Path) -> None:
    from dist_train.bench.ckpt_io import PlainFiles

    model = torch.nn.Sequential(*(torch.nn.Linear(4, 3, bias=False) for _ in range(3)))
    tensors = {k: t.detach().clone() for k, t in model.state_dict().items()}
    files = PlainFiles(tmp_path, model, CPU1, keep=2)
    for _ in range(3):  # new files each save; only the newest `keep` stay
        files.raw_write()
        files.torch_save()
    files.raw_write(in_place=True)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "inplace_rank0.bin",
        "pt_rank0_000003.bin",
        "pt_rank0_000005.bin",
        "raw_rank0_000002.bin",
        "raw_rank0_000004.bin",
    ]
    files.raw_read()  # the newest raw file
    flat = torch.cat([tensors[k].flatten() for k in sorted(tensors)])
    assert torch.equal(files.scratch.view(torch.float32), flat)  # the share is sorted by name
    files.torch_load()
    assert all(torch.equal(files._held[0][k], t) for k, t in tensors.items())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    files.torch_load(into_model=True)  # what a resume does: back into the model
    assert all(torch.equal(model.state_dict()[k], t) for k, t in tensors.items())
    files.release()
    files.copy_into_buffer()
    assert files.bytes_written() == {
        "raw": 3 * 12 * 4,
        "torch.save": files.path("pt", 0).stat().st_size,
    }
    second = PlainFiles(tmp_path, model, DistEnv(1, 1, 2, 2, torch.device("cpu"), "gloo"))
    assert list(second.share) == ["1.weight"]  # rank 1 of 2 writes every other tensor


def smoke_checkpoint(monkeypatch: pytest.MonkeyPatch, nproc: int) -> dict[str, Any]:
    """--steps 1 --warmup 0 --repeats 2: loads still find files to read (written first)."""
    monkeypatch.setenv("DIST_TRAIN_BENCH_CKPT_PARAMS", CKPT_PARAMS)
    args = BenchArgs(
        "checkpoint", QUICKSTART, TINY, nproc=nproc, steps=1, warmup=0, repeats=2, threads=1
    )
    report = load_runner(get_benchmark("checkpoint"))(args)
    data = report.to_json()
    assert format_table(report).startswith("== bench checkpoint ==")
    assert [r["name"] for r in data["results"]] == CKPT_ROWS
    for row in data["results"]:
        assert all(finite_positive(row["time_s"][k]) for k in ("median", "q1", "q3", "min"))
        assert len(row["time_s_per_round"]) == 2
        assert (row["rate"] == "") == ("blocking" in row["name"])  # a rate for all but these
        for key in ("GBps", "steps_per_sec"):
            if key in row:
                assert finite_positive(row[key]["median"]), (row["name"], key)
    assert len(data["ratios"]) == 10  # 5 targets, 4 references, the checksum cost
    for label, ratio in data["ratios"].items():
        assert all(finite_positive(ratio[k]) for k in ("median", "q1", "q3", "ratio_of_medians"))
        assert len(ratio["per_round"]) == 2, label
    s = data["settings"]
    assert (s["world_size"], s["threads"], s["args"]["nproc"]) == (nproc, 1, nproc)
    assert s["raw_bytes_written"] == s["state_bytes"] == 4 * s["params"]
    assert s["dcp_bytes_written"] > s["state_bytes"] < s["torch_save_bytes_written"]
    assert s["train_window_steps"] >= 2 and s["slow_state_bytes"] <= s["state_bytes"]
    assert data["notes"][-1].startswith("targets")
    return data


def test_smoke_checkpoint_one_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    data = smoke_checkpoint(monkeypatch, 1)
    assert list(data["settings"]["dcp_files_bytes"]).count("__0_0.distcp") == 1


@pytest.mark.distributed
def test_smoke_checkpoint_two_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    data = smoke_checkpoint(monkeypatch, 2)
    files = set(data["settings"]["dcp_files_bytes"])
    assert {"rng/rank_0.pt", "rng/rank_1.pt", ".metadata", "__0_0.distcp", "__1_0.distcp"} <= files
