"""`dist-train prepare` (every input kind and tokenizer, worker-count independence, atomic output,
one-line errors) and the `tokens` loader reading what it writes."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dist_train.config.load import load_config
from dist_train.data import sources
from dist_train.data.build import build_data
from dist_train.data.prepare import PrepareConfig, prepare_tokens
from dist_train.data.progress import Progress
from dist_train.data.tokenizer import segments
from dist_train.errors import ConfigError

from conftest import GPT_SHAPE, TINY_RUN, cli

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")
# Prose with repeats (so that a BPE learns merges), non-ASCII and a Windows line end.
DOCS = [
    f"Doc {i}: the quick brown fox jumps over {i % 7} lazy dogs; naïve café, 東京.\r\n"
    * (1 + i % 3)
    for i in range(40)
]


def prep(inputs: list[Path], out: Path, **kw: Any) -> dict[str, Any]:
    kw.setdefault("workers", 1)
    return prepare_tokens(PrepareConfig(tuple(map(str, inputs)), str(out), **kw), log=print)


def ids(out: Path, split: str = "train") -> np.ndarray:
    meta = json.loads((out / "meta.json").read_text())
    return np.fromfile(out / f"{split}.bin", dtype=np.dtype(meta["dtype"]))


def all_ids(out: Path) -> list[int]:
    val = ids(out, "val").tolist() if (out / "val.bin").exists() else []
    return ids(out).tolist() + val


def write_jsonl(path: Path, docs: list[Any], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "n": i}) + "\n" for i, d in enumerate(docs)))
    return path


def loaded(out: Path, *overrides: str) -> Any:
    cfg = load_config(
        None, ["data.name=tokens", f"data.path={out}", "model.block_size=8", *overrides]
    )
    return build_data(cfg)


def test_char_round_trips_the_text_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(DOCS)
    (tmp_path / "t.txt").write_bytes(text.encode())
    monkeypatch.setattr(sources, "BLOCK_BYTES", 100)  # many blocks, cut at newlines
    meta = prep([tmp_path / "t.txt"], tmp_path / "out", chunk_chars=300, val_fraction=0.25)
    chars = meta["tokenizer"]["chars"]
    assert chars == "".join(sorted(set(text))) and meta["vocab_size"] == len(chars)
    assert meta["dtype"] == "uint16" and meta["eot_token"] is None
    assert meta["train_tokens"] == int(len(text) * 0.75) == len(ids(tmp_path / "out"))
    assert meta["train_tokens"] + meta["val_tokens"] == len(text)
    assert "".join(chars[i] for i in all_ids(tmp_path / "out")) == text
    data = loaded(tmp_path / "out")  # the loader: vocabulary and decoder from meta.json
    assert data.spec.vocab_size == len(chars) and data.spec.decode(data.spec.encode(text)) == text
    x, y = data.train.get_batch(torch.tensor([0, 3]))
    assert data.spec.decode(x[0].tolist()) == text[:8] and torch.equal(x[:, 1:], y[:, :-1])
    (tmp_path / "u.txt").write_text("no newline at the end")  # a document ends with one
    prep([tmp_path / "u.txt"], tmp_path / "u", tokenizer="bytes", val_fraction=0)
    assert bytes(all_ids(tmp_path / "u")) == b"no newline at the end\n"
    assert not (tmp_path / "u/val.bin").exists()  # fraction 0: no empty file


def test_jsonl_documents_as_bytes(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", ["héllo", "two\nlines\n", None, "", "last"])
    with path.open("a") as f:
        f.write("\n")  # a blank line is skipped
    meta = prep([path], tmp_path / "out", tokenizer="bytes", val_fraction=0.2)
    expected = "héllo\ntwo\nlines\nlast\n".encode()
    assert bytes(all_ids(tmp_path / "out")) == expected and meta["vocab_size"] == 256
    assert meta["sources"] == [
        {"path": str(path), "kind": "jsonl", "field": "text", "split": "train"}
    ]
    assert loaded(tmp_path / "out").spec.decode(list("é".encode())) == "é"


def test_parquet_column_in_row_groups(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"id": list(range(len(DOCS))), "content": DOCS})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    meta = prep([tmp_path / "d.parquet"], tmp_path / "out", field="content", chunk_chars=500)
    chars = meta["tokenizer"]["chars"]
    assert "".join(chars[i] for i in all_ids(tmp_path / "out")) == "".join(DOCS)  # each ends \n
    with pytest.raises(
        ConfigError, match=r"^--field='text': .* no such column \(it has id, content\)"
    ):
        prep([tmp_path / "d.parquet"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_saved_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets", reason="the optional `datasets` extra")
    ds = datasets.Dataset.from_dict({"text": DOCS[:10], "n": list(range(10))})
    ds.save_to_disk(str(tmp_path / "ds"))
    meta = prep([tmp_path / "ds"], tmp_path / "out", tokenizer="bytes")
    assert bytes(all_ids(tmp_path / "out")).decode() == "".join(DOCS[:10])
    assert meta["sources"][0]["kind"] == "hf"
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(ConfigError, match=r"a DatasetDict: give one split's folder \(.*dd/train"):
        prep([tmp_path / "dd"], tmp_path / "bad")


def test_bpe_learned_from_the_input_then_reused(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    meta = prep([path], tmp_path / "bpe", tokenizer="bpe", vocab_size=300, chunk_chars=400)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "bpe/tokenizer.json"))
    stored = (tmp_path / "bpe/tokenizer.json").read_bytes()
    assert meta["tokenizer"] == {
        "type": "tokenizers",
        "file": "tokenizer.json",
        "sha256": hashlib.sha256(stored).hexdigest(),
    }
    eot = tok.token_to_id("<|endoftext|>")
    assert meta["eot_token"] == eot and 256 < meta["vocab_size"] <= 300
    tokens = all_ids(tmp_path / "bpe")
    assert tokens.count(eot) == len(DOCS) and tokens[-1] == eot and max(tokens) < 300
    assert len(tokens) < len("".join(DOCS).encode()) / 2  # merges were learned
    assert tok.decode(tokens) == "".join(DOCS)  # byte-level: exact, special tokens skipped
    data = loaded(tmp_path / "bpe")
    assert data.spec.decode(data.spec.encode("the quick fox")) == "the quick fox"
    # A given tokenizer.json (here the one just learned) encodes the same input the same way.
    again = prep([path], tmp_path / "given", tokenizer=str(tmp_path / "bpe/tokenizer.json"))
    assert all_ids(tmp_path / "given") == tokens and again["tokenizer"] == meta["tokenizer"]


@pytest.mark.parametrize("special", ["</s>", None])
def test_tokenizer_json_end_of_text_or_newline(tmp_path: Path, special: str | None) -> None:
    tk = pytest.importorskip("tokenizers")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=280, special_tokens=[special] if special else [])
    tok.train_from_iterator(DOCS, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = ["no newline", "with one\n"]
    meta = prep(
        [write_jsonl(tmp_path / "d.jsonl", docs)], tmp_path / "out", tokenizer=str(tmp_path)
    )
    tokens = all_ids(tmp_path / "out")
    if special:  # Llama 2's end of text, found by name: after every document
        eot = tok.token_to_id(special)
        assert meta["eot_token"] == eot and tokens.count(eot) == 2 and tokens[-1] == eot
        assert tok.decode(tokens) == "no newlinewith one\n"
    else:  # none in the vocabulary: each document ends with a newline, as with char
        assert meta["eot_token"] is None and tok.decode(tokens) == "no newline\nwith one\n"


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_any_number_of_workers_writes_the_same_bytes(tmp_path: Path, tokenizer: str) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS * 3)
    kw = {"tokenizer": tokenizer, "vocab_size": 300 if tokenizer == "bpe" else 0}
    prep([path], tmp_path / "w1", workers=1, chunk_chars=300, **kw)
    prep([path], tmp_path / "w2", workers=2, chunk_chars=300, **kw)
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert {"train.bin", "val.bin", "meta.json"} <= set(names)
    for name in names:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes()


def test_uint32_when_the_vocabulary_needs_it(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"w{i}": i for i in range(70_000)} | {"[UNK]": 70_000, "<|endoftext|>": 70_001}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
    tok.save(str(tmp_path / "tokenizer.json"))
    words = [f"w{(i * 7919) % 70_000}" for i in range(300)]
    (tmp_path / "t.txt").write_text(" ".join(words))
    meta = prep([tmp_path / "t.txt"], tmp_path / "out", tokenizer=str(tmp_path))
    assert meta["dtype"] == "uint32" and meta["vocab_size"] == 70_002
    assert (tmp_path / "out/train.bin").stat().st_size == 4 * meta["train_tokens"]
    expected = [int(w[1:]) for w in words] + [70_001]
    assert all_ids(tmp_path / "out") == expected and max(expected) > 2**16
    data = loaded(tmp_path / "out")
    assert data.spec.vocab_size == 70_002
    x, _ = data.train.get_batch(torch.tensor([0]))
    assert x[0].tolist() == expected[:8] and data.spec.decode(x[0].tolist()[:2]) == " ".join(
        words[:2]
    )
    (tmp_path / "out/train.bin").write_bytes(b"\x00" * 4 * meta["train_tokens"] + b"\x00\x00")
    with pytest.raises(
        ConfigError, match=r"expected a non-empty file of uint32 token ids \(a multiple of 4"
    ):
        loaded(tmp_path / "out")


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


def test_inputs_from_folders_globs_and_val_files(tmp_path: Path) -> None:
    (tmp_path / "in/sub").mkdir(parents=True)
    (tmp_path / "in/b.txt").write_text("bee\n")
    (tmp_path / "in/sub/c.jsonl").write_text('{"text": "sea"}\n')
    (tmp_path / "in/.hidden").write_text("not corpus")
    (tmp_path / "in/a.txt").write_text("ay\n")
    (tmp_path / "v.txt").write_text("vee\n")
    meta = prep(
        [tmp_path / "in", tmp_path / "in/*.txt"],
        tmp_path / "out",
        tokenizer="bytes",
        val_inputs=(str(tmp_path / "v.txt"),),
    )
    assert bytes(ids(tmp_path / "out").tolist()) == b"ay\nbee\nsea\nay\nbee\n"
    assert bytes(ids(tmp_path / "out", "val").tolist()) == b"vee\n" and meta["val_fraction"] is None
    assert [s["split"] for s in meta["sources"]] == ["train"] * 5 + ["val"]


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


def test_progress_line_without_a_terminal() -> None:
    stream = io.StringIO()
    progress = Progress("encoding train", 4_000_000, stream=stream, every_s=0)
    progress.update(1_000_000, 250_000)
    line = stream.getvalue()
    assert line.startswith("encoding train: 1.0 of 4.0 MB (25%), 250,000 tokens, ")
    assert line.endswith(" MB/s\n") and line.count("\n") == 1


def test_tinyshakespeare_matches_nanogpt_char(tmp_path: Path) -> None:
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is not on this machine")
    text = SHAKESPEARE.read_text()
    meta = prep([SHAKESPEARE], tmp_path / "out", workers=2)
    # nanoGPT's data/shakespeare_char/prepare.py: sorted characters, the first 90% for training.
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    n = len(text)
    assert meta["vocab_size"] == len(chars) and meta["train_tokens"] == int(n * 0.9)
    assert ids(tmp_path / "out").tolist() == [stoi[c] for c in text[: int(n * 0.9)]]
    assert ids(tmp_path / "out", "val").tolist() == [stoi[c] for c in text[int(n * 0.9) :]]


@pytest.mark.slow
def test_cli_prepare_then_train_and_sample(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS * 5)
    out = tmp_path / "tok"
    proc = cli("prepare", str(path), "--out", str(out), "--tokenizer", "bpe", "--vocab-size", "300")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"wrote {out}/train.bin (") and "data.path=" in proc.stdout
    run = cli(
        "train",
        "quickstart",
        *TINY_RUN,
        *GPT_SHAPE,
        "model.block_size=32",
        "data.name=tokens",
        f"data.path={out}",
        "train.max_steps=3",
        "train.sample_chars=20",
        "train.sample_prompt=Doc",
        f"train.run_dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    sample = run.stdout.split("--- sample (20 tokens) ---\n")[1].split("\n---")[0]
    assert sample.startswith("Doc") and len(sample) > len("Doc")  # decoded by tokenizer.json
    config = (tmp_path / "run/config.yaml").read_text()
    assert f"path: {out}" in config


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


def test_long_texts_reach_the_tokenizer_in_segments() -> None:
    text = "line one\n" * 1000 + "word " * 2000 + "x" * 10_000
    parts = segments(text, size=4096)
    assert "".join(parts) == text and max(map(len, parts)) <= 4096
    assert parts[0].endswith("\n") and parts[0].count("\n") == 4096 // 9  # after a newline
    spaced = [p for p in parts if p.startswith(" word")]
    assert spaced and all(p.endswith("word") for p in spaced[:-1])  # before a space
    assert parts[-2] == "x" * 4096 and set(parts[-1]) == {"x"}  # no space at all: anywhere
    assert segments("") == [""] and segments("short") == ["short"]
