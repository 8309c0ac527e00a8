"""`dist-train prepare`: text, JSONL, Parquet or a saved `datasets` dataset -> train.bin/val.bin
token ids plus meta.json, the format the `tokens` loader reads. The input is streamed; batches
are encoded on N processes and written in input order, so the bytes are the same for any N."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from dist_train.data.encoder import Encoder
from dist_train.data.outdir import FORMAT, VERSION, OutputDir
from dist_train.data.progress import Progress
from dist_train.data.sources import (
    Piece,
    Source,
    batches,
    documents,
    expand_inputs,
    read_source,
)
from dist_train.data.tokenizer import (
    KINDS,
    TOKENIZER_FILE,
    Codec,
    TokenizerSpec,
    build_codec,
    load_tokenizer_file,
    token_dtype,
    train_bpe,
)
from dist_train.errors import ConfigError

COPY_BYTES = 16 << 20  # the validation tail moves out of train.bin in blocks of this size
# The largest --vocab-size a BPE may learn: 4x the largest vocabularies in use (Gemma's 262,144).
# Ids up to 2**32 would fit train.bin's uint32, but no model could afford such an embedding, and
# the tokenizers library reserves ~70 bytes per entry up front (tokenizers 0.23: --vocab-size
# 1000000000 asked for 71 GB and aborted the process with a Rust backtrace).
MAX_VOCAB = 1 << 20


@dataclass(frozen=True)
class PrepareConfig:
    inputs: tuple[str, ...]  # files, folders, glob patterns
    out: str
    tokenizer: str = "char"  # char | bytes | bpe | PATH to a tokenizer.json (or its folder)
    vocab_size: int = 0  # bpe only: the vocabulary to learn
    field: str = "text"  # JSONL field / Parquet or dataset column holding the text
    val_fraction: float | None = None  # tail of the token stream; None: 0.1 unless val_inputs
    val_inputs: tuple[str, ...] = ()  # validation from these inputs instead of a tail
    workers: int = 0  # encoding processes; 0: every core this process may use
    chunk_chars: int = 1 << 20  # characters per encoding task (tests make it small)


def check_config(cfg: PrepareConfig) -> None:
    """Every option error before any input is read or the output touched."""
    bpe = cfg.tokenizer == "bpe"
    if cfg.vocab_size and not bpe:
        why = "char, bytes and a tokenizer.json bring their own vocabulary"
        raise ConfigError("--vocab-size", cfg.vocab_size, f"only --tokenizer bpe learns one; {why}")
    if bpe and cfg.vocab_size < 257:
        raise ConfigError(
            "--vocab-size",
            cfg.vocab_size,
            "--tokenizer bpe needs a vocabulary of at least 257 (256 bytes + <|endoftext|>), "
            "e.g. --vocab-size 8192",
        )
    if bpe and cfg.vocab_size > MAX_VOCAB:
        raise ConfigError(
            "--vocab-size",
            cfg.vocab_size,
            f"at most {MAX_VOCAB:,} (2**20, four times the largest vocabularies in use); "
            "GPT-2 has 50,257, Llama 3 128,256",
        )
    if cfg.tokenizer not in KINDS and not Path(cfg.tokenizer).exists():
        why = "not char, bytes, bpe, or an existing tokenizer.json (or a folder holding one)"
        raise ConfigError("--tokenizer", cfg.tokenizer, why)
    if cfg.val_fraction is not None and cfg.val_inputs:
        raise ConfigError("--val-fraction", cfg.val_fraction, "give it or --val, not both")
    if cfg.val_fraction is not None and not 0 <= cfg.val_fraction < 1:
        raise ConfigError("--val-fraction", cfg.val_fraction, "must be in [0, 1)")
    if cfg.workers < 0:
        raise ConfigError("--workers", cfg.workers, "must be >= 1 (0: every core)")
    if not cfg.field:
        raise ConfigError("--field", cfg.field, "must name a field or column")


def prepare_tokens(cfg: PrepareConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Writes OUT/train.bin, val.bin (unless empty), meta.json (and tokenizer.json); returns
    the meta. On any failure, or an interrupt, OUT is as it was before."""
    check_config(cfg)
    train = expand_inputs(cfg.inputs, "INPUT", Path(cfg.out))
    val = expand_inputs(cfg.val_inputs, "--val", Path(cfg.out))
    given = (
        None if cfg.tokenizer in KINDS else load_tokenizer_file(Path(cfg.tokenizer), "--tokenizer")
    )
    out = OutputDir(Path(cfg.out), log)
    try:
        start = time.monotonic()
        spec = given or _learn(cfg, train, val)
        codec = build_codec(spec)
        if spec.kind == "tokenizers":
            with writing(out, TOKENIZER_FILE):
                out.file(TOKENIZER_FILE).write_bytes(spec.json.encode("utf-8"))
        meta = _encode_all(cfg, spec, codec, train, val, out)
        with writing(out, "meta.json"):
            out.commit(meta)
        meta["seconds"] = time.monotonic() - start
        return meta
    except BaseException:  # an interrupt too: the output stays as it was
        out.abort()
        raise


def _stream(sources: list[Source], field: str, newline: bool) -> Iterator[Piece]:
    return documents(chain.from_iterable(read_source(s, field) for s in sources), newline)


def _counted(pieces: Iterable[Piece], progress: Progress) -> Iterator[str]:
    for piece in pieces:
        progress.update(piece.size)
        yield piece.text


def _learn(cfg: PrepareConfig, train: list[Source], val: list[Source]) -> TokenizerSpec:
    """A first pass over the input: the alphabet (char, from every input, so that validation
    has no unknown character) or a BPE trained on the training inputs."""
    if cfg.tokenizer == "bytes":
        return TokenizerSpec("bytes")
    sources = train + val if cfg.tokenizer == "char" else train
    what = "alphabet" if cfg.tokenizer == "char" else f"training a BPE of {cfg.vocab_size}"
    with Progress(what, sum(s.size for s in sources)) as progress:
        texts = _counted(_stream(sources, cfg.field, newline=cfg.tokenizer == "char"), progress)
        if cfg.tokenizer == "bpe":
            return train_bpe((t for t in texts if t), cfg.vocab_size)
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return TokenizerSpec("char", chars="".join(sorted(seen)))  # code point order


def _encode_all(
    cfg: PrepareConfig,
    spec: TokenizerSpec,
    codec: Codec,
    train: list[Source],
    val: list[Source],
    out: OutputDir,
) -> dict[str, Any]:
    dtype, newline = token_dtype(codec.vocab_size), codec.eot is None
    fraction = (0.0 if val else 0.1) if cfg.val_fraction is None else cfg.val_fraction
    counts = {"train": 0, "val": 0}
    with Encoder(spec, dtype, cfg.workers or _cores()) as encoder:
        for split, sources in (("train", train), ("val", val)):
            if sources:
                stream = batches(_stream(sources, cfg.field, newline), cfg.chunk_chars)
                with Progress(f"encoding {split}", sum(s.size for s in sources)) as progress:
                    counts[split] = _write(out, f"{split}.bin", encoder.map(stream), progress)
    if val and not counts["val"]:
        raise ConfigError("--val", " ".join(cfg.val_inputs), "holds no text")
    if not val and fraction:
        with writing(out, "val.bin"):
            counts["train"], counts["val"] = _split_tail(out, counts["train"], fraction, dtype)
    if counts["train"] == 0:
        raise ConfigError(
            "INPUT", " ".join(cfg.inputs), f"holds too little text ({sum(counts.values())} tokens)"
        )
    if counts["val"] == 0:  # the loader refuses an empty file: none at all instead
        out.file("val.bin").unlink(missing_ok=True)
    sources = [{**s.describe(cfg.field), "split": "train"} for s in train]
    sources += [{**s.describe(cfg.field), "split": "val"} for s in val]
    return {
        "format": FORMAT,
        "version": VERSION,
        "dtype": dtype.name,
        "vocab_size": codec.vocab_size,
        "tokenizer": spec.meta(),
        "eot_token": codec.eot,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "val_fraction": None if val else fraction,
        "sources": sources,
    }


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _write(
    out: OutputDir, name: str, results: Iterator[tuple[np.ndarray, int]], progress: Progress
) -> int:
    """Appends each batch's ids as it arrives (memory stays bounded); returns the token count.
    Only the writes are `writing`: an error while reading the input is the input's own."""
    count = 0
    with writing(out, name):
        f = open(out.file(name), "wb")  # noqa: SIM115  # closed below, whatever happens
    with f:
        for ids, size in results:
            with writing(out, name):
                f.write(ids.tobytes())
            count += len(ids)
            progress.update(size, len(ids))
        with writing(out, name):
            f.flush()
            os.fsync(f.fileno())
    return count


@contextmanager
def writing(out: OutputDir, name: str) -> Iterator[None]:
    """A write that fails (a full disk, a quota, a read-only file system) as one line naming
    the file; the caller leaves --out as it was."""
    try:
        yield
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(
            "--out", str(out.path), f"cannot write {name} ({reason}); left as it was"
        ) from None


def _split_tail(out: OutputDir, total: int, fraction: float, dtype: np.dtype) -> tuple[int, int]:
    """The last `fraction` of the token stream becomes val.bin, as the text loader splits:
    contiguous, so no window straddles both (it may cut a document in two)."""
    cut = int(total * (1 - fraction))
    train, val = out.file("train.bin"), out.file("val.bin")
    with open(train, "rb") as src, open(val, "wb") as dst:
        src.seek(cut * dtype.itemsize)
        while block := src.read(COPY_BYTES):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    os.truncate(train, cut * dtype.itemsize)
    return cut, total - cut
