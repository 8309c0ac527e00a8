"""`dist-train prepare`: every input kind (text, JSONL, Parquet, a saved HF dataset, folders
and globs) and tokenizer (char, bytes, a learned BPE, a given tokenizer.json), worker-count
independence, the `tokens` loader reading what it writes, the progress line, and the CLI from
prepare to a trained run's sample."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
import torch

from dist_train.data import sources
from dist_train.data.progress import Progress
from dist_train.data.tokenizer import segments
from dist_train.errors import ConfigError

from conftest import cli
from helpers import GPT_SHAPE, TINY_RUN
from helpers_prepare import DOCS, all_ids, ids, loaded, prep, write_jsonl

SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


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
        "train.sample_tokens=20",
        "train.sample_prompt=Doc",
        f"train.run_dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    sample = run.stdout.split("--- sample (20 tokens) ---\n")[1].split("\n---")[0]
    assert sample.startswith("Doc") and len(sample) > len("Doc")  # decoded by tokenizer.json
    config = (tmp_path / "run/config.yaml").read_text()
    assert f"path: {out}" in config


def test_long_texts_reach_the_tokenizer_in_segments() -> None:
    text = "line one\n" * 1000 + "word " * 2000 + "x" * 10_000
    parts = segments(text, size=4096)
    assert "".join(parts) == text and max(map(len, parts)) <= 4096
    assert parts[0].endswith("\n") and parts[0].count("\n") == 4096 // 9  # after a newline
    spaced = [p for p in parts if p.startswith(" word")]
    assert spaced and all(p.endswith("word") for p in spaced[:-1])  # before a space
    assert parts[-2] == "x" * 4096 and set(parts[-1]) == {"x"}  # no space at all: anywhere
    assert segments("") == [""] and segments("short") == ["short"]
