"""`dist-train prepare` and the `tokens` loader refusing bad input: the loader's checks of ids,
counts and tokenizer, a bad input that is one error and leaves nothing, the output directory's
rules and atomic replacement, and the CLI's one-line errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dist_train.errors import ConfigError

from conftest import cli
from helpers_prepare import DOCS, all_ids, ids, loaded, prep, write_jsonl


def test_loader_checks_range_counts_and_tokenizer(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    prep([path], tmp_path / "out", tokenizer="bpe", vocab_size=300)
    out, meta = tmp_path / "out", json.loads((tmp_path / "out/meta.json").read_text())
    top = max(all_ids(out))
    with pytest.raises(
        ConfigError,
        match=rf"^data.vocab_size=5: the tokens hold id {top}, .* set data.vocab_size={top + 1} or more",
    ):
        loaded(out, "data.vocab_size=5")
    (out / "meta.json").write_text(json.dumps({**meta, "vocab_size": 100}))
    with pytest.raises(
        ConfigError, match=rf"^data.path='{out}': .*not 100 \(the vocab_size of {out}/meta.json\)"
    ):
        loaded(out)
    (out / "meta.json").write_text(json.dumps(meta))
    good = (out / "tokenizer.json").read_bytes()
    (out / "tokenizer.json").write_bytes(good + b"\n")  # valid, but not the one recorded
    with pytest.raises(
        ConfigError, match=r"tokenizer.json.*differs from the tokenizer meta.json recorded"
    ):
        loaded(out)
    (out / "tokenizer.json").write_bytes(good)
    (out / "meta.json").write_text(json.dumps({**meta, "train_tokens": meta["train_tokens"] + 1}))
    with pytest.raises(ConfigError, match=r"train.bin'.*holds \d+ tokens but meta.json records"):
        loaded(out)
    (out / "meta.json").write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(ConfigError, match="written by a newer dist_train"):
        loaded(out)


def test_nanogpt_meta_pkl_still_wins_without_meta_json(tmp_path: Path) -> None:
    np.arange(100, dtype=np.uint16).__mod__(5).astype(np.uint16).tofile(tmp_path / "train.bin")
    (tmp_path / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": 3, "itos": {0: "a"}}))
    with pytest.raises(
        ConfigError, match=r"the tokens hold id 4, .*not 3 \(the vocab_size of .*meta.pkl\)"
    ):
        loaded(tmp_path)


def _corpus(tmp: Path) -> Path:
    return write_jsonl(tmp / "d.jsonl", DOCS)


def _bad_line(tmp: Path) -> Path:
    path = write_jsonl(tmp / "bad.jsonl", DOCS)  # many batches are written before line 41
    with path.open("a") as f:
        f.write("{not json\n")
    return path


def _wrong_field(tmp: Path) -> Path:
    return write_jsonl(tmp / "d.jsonl", ["x"], field="body")


def _latin1(end: str) -> Any:
    def make(tmp: Path) -> Path:
        (tmp / "l.txt").write_bytes(b"ok\n" * 500 + f"café{end}".encode("latin-1"))
        return tmp / "l.txt"

    return make


BAD = [
    ("missing input", lambda t: t / "nope.txt", {}, r"^INPUT='.*nope.txt': no such file"),
    ("bad JSON line", _bad_line, {}, r"^INPUT='.*bad.jsonl:41': not a JSON line"),
    (
        "missing field",
        _wrong_field,
        {},
        r"^--field='text': .*d.jsonl:1 has no such field \(it has 'body', 'n'\)",
    ),
    ("not UTF-8", _latin1(" au lait\n"), {}, r"^INPUT='.*l.txt': not UTF-8 text \(at byte 1503\)"),
    ("not UTF-8 at the end", _latin1(""), {}, r"^INPUT='.*l.txt': not UTF-8 text \(at byte 1503\)"),
    (
        "vocab too small",
        _corpus,
        {"tokenizer": "bpe", "vocab_size": 100},
        r"^--vocab-size=100: .*at least 257",
    ),
    ("vocab without bpe", _corpus, {"vocab_size": 500}, r"^--vocab-size=500: only --tokenizer bpe"),
    (
        "unknown tokenizer",
        _corpus,
        {"tokenizer": "gpt9"},
        r"^--tokenizer='gpt9': not char, bytes, bpe",
    ),
    (
        "val twice",
        _corpus,
        {"val_fraction": 0.1, "val_inputs": ("x",)},
        r"^--val-fraction=0.1: give it or --val",
    ),
    (
        "no text",
        lambda t: write_jsonl(t / "e.jsonl", ["", None]),
        {},
        r"^INPUT=.*holds too little text \(0 tokens\)",
    ),
]


@pytest.mark.parametrize(("name", "make", "kw", "match"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_and_leaves_nothing(
    tmp_path: Path, name: str, make: Any, kw: dict[str, Any], match: str
) -> None:
    path = make(tmp_path)
    with pytest.raises(ConfigError, match=match):
        prep([path], tmp_path / "new/out", chunk_chars=200, **kw)
    assert not (tmp_path / "new").exists()


def test_output_dir_rules_and_atomic_replacement(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("keep me")
    with pytest.raises(
        ConfigError,
        match=r"^--out='.*mine': holds notes.txt, which dist-train prepare did not write",
    ):
        prep([_corpus(tmp_path)], tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    out = tmp_path / "out"
    prep([_corpus(tmp_path)], out, tokenizer="bpe", vocab_size=300)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(ConfigError, match=r"bad\.jsonl:41"):  # fails after writing some batches
        prep([_bad_line(tmp_path)], out, chunk_chars=200)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no staging folder left
    meta = prep([_corpus(tmp_path)], out, tokenizer="bytes", val_fraction=0)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin"]  # stale files go
    assert meta["train_tokens"] == len(ids(out))
    (out / ".prepare-999999999").mkdir()  # what a prepare killed by SIGKILL leaves
    (out / "meta.json").unlink()  # ... when killed between its last renames
    with pytest.raises(ConfigError, match="a dist-train prepare is writing here or was killed"):
        loaded(out)
    prep([_corpus(tmp_path)], out, tokenizer="bytes")
    assert capsys.readouterr().out.endswith(
        "removing .prepare-999999999, left by a prepare that was killed\n"
    )
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


CLI_BAD = [
    (["nope.txt"], "INPUT='nope.txt': no such file or directory"),
    (
        ["d.jsonl", "--field", "body"],
        "--field='body': d.jsonl:1 has no such field (it has 'text', 'n')",
    ),
    (
        ["d.jsonl", "--tokenizer", "bpe", "--vocab-size", "10"],
        "--vocab-size=10: --tokenizer bpe needs",
    ),
    (["d.jsonl", "--vocab-size", "300"], "--vocab-size=300: only --tokenizer bpe learns one"),
    (["d.jsonl", "--tokenizer", "bytes", "x.y=3"], "unrecognized arguments: x.y=3"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_cli_errors_are_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    write_jsonl(tmp_path / "d.jsonl", DOCS[:3])
    proc = cli("prepare", *args, "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == f"error: {proc.stderr[7:]}" and proc.stderr.count("\n") == 1
    assert message in proc.stderr and not (tmp_path / "out").exists()
