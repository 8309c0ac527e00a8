"""Tokenizers shared by `dist-train prepare` and the `tokens` loader: characters, UTF-8 bytes, or
a `tokenizer.json` of the `tokenizers` library (given, or a byte-level BPE trained on the input).
Each one is a small `Codec`; a `TokenizerSpec` is what a worker process rebuilds it from."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from dist_train.errors import ConfigError, first_line, import_extra

EOT = "<|endoftext|>"  # GPT-2's end-of-text token; a BPE learned here has it
# The first of these in a tokenizer's vocabulary separates documents (GPT-2, Llama 3, Llama 2 /
# Mistral, Gemma); without any, documents end with a newline, as with char and bytes.
EOT_NAMES = (EOT, "<|end_of_text|>", "</s>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"
KINDS = ("char", "bytes", "bpe")  # --tokenizer NAME; anything else is a tokenizer.json path
SEGMENT_CHARS = 4096  # the longest string handed to the tokenizers library (see `segments`)


class Codec(Protocol):
    vocab_size: int
    eot: int | None  # id appended after each document; None: documents end with a newline

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything a worker process needs to rebuild the codec (pickled once per worker)."""

    kind: str  # char | bytes | tokenizers
    chars: str = ""  # char: the alphabet, sorted by code point
    json: str = ""  # tokenizers: the tokenizer.json text, stored as is in the output directory

    def meta(self) -> dict[str, Any]:
        """The `tokenizer` entry of meta.json."""
        if self.kind == "char":
            return {"type": "char", "chars": self.chars}
        if self.kind == "bytes":
            return {"type": "bytes"}
        sha = hashlib.sha256(self.json.encode("utf-8")).hexdigest()
        return {"type": "tokenizers", "file": TOKENIZER_FILE, "sha256": sha}


class CharCodec:
    """One id per character of a fixed alphabet (nanoGPT's shakespeare_char): ids follow code
    point order, so the same alphabet always gives the same ids."""

    def __init__(self, chars: str) -> None:
        self.chars, self.vocab_size, self.eot = chars, len(chars), None
        self._codes = np.frombuffer(_utf32(chars), dtype=np.uint32)

    def _ids(self, text: str) -> np.ndarray:
        codes = np.frombuffer(_utf32(text), dtype=np.uint32)
        ids = np.minimum(np.searchsorted(self._codes, codes), max(self.vocab_size - 1, 0))
        # Characters outside the alphabet (only ever in a prompt) are dropped, as the text
        # loader does; prepare builds the alphabet from the very text it encodes.
        return ids[self._codes[ids] == codes] if len(self._codes) else ids[:0]

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self._ids(t) for t in texts]

    def encode(self, text: str) -> list[int]:
        return self._ids(text).tolist()

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)


class BytesCodec:
    """The 256 values of a UTF-8 byte: no alphabet to learn, any text at all."""

    vocab_size, eot = 256, None

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", "surrogatepass"), dtype=np.uint8) for t in texts]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", "surrogatepass"))

    def decode(self, ids: list[int]) -> str:
        # A sample may stop inside a multi-byte character: show it, do not fail on it.
        return bytes(ids).decode("utf-8", errors="replace")


class TokenizersCodec:
    """A `tokenizers.Tokenizer`: documents are encoded without the tokenizer's own special
    tokens (a BERT-style [CLS]/[SEP] means nothing to a language model) and followed by its
    end-of-text token when the vocabulary has one of EOT_NAMES."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # The largest id, not the entry count: a vocabulary may have gaps.
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1
        found = [tokenizer.token_to_id(name) for name in EOT_NAMES]
        self.eot = next((i for i in found if i is not None), None)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        parts = [segments(t) for t in texts]
        # encode_batch_fast (tokenizers >= 0.20) skips the character offsets we do not use.
        encode = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        flat = encode([s for p in parts for s in p], add_special_tokens=False)
        ids, at = [], 0
        for p in parts:
            ids.append(
                np.concatenate([np.asarray(e.ids, np.uint32) for e in flat[at : at + len(p)]])
            )
            at += len(p)
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)


def segments(text: str, size: int = SEGMENT_CHARS) -> list[str]:
    """`text` in strings of at most `size` characters, cut after a newline, else before a space
    (" word" stays whole), else anywhere. A cut may change the tokens at it, the same way on
    every run; the tokenizers library is several times faster (and uses far less memory) on
    strings of a few KB than on one of a megabyte."""
    out, start = [], 0
    while len(text) - start > size:
        end = text.rfind("\n", start, start + size) + 1
        if end <= start:
            end = text.rfind(" ", start + 1, start + size)
        if end <= start:
            end = start + size
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def _utf32(text: str) -> bytes:
    # surrogatepass: a JSON string may hold a lone surrogate ("\ud800"); it is a character too
    return text.encode("utf-32-le", "surrogatepass")


def build_codec(spec: TokenizerSpec) -> Codec:
    if spec.kind == "char":
        return CharCodec(spec.chars)
    if spec.kind == "bytes":
        return BytesCodec()
    tokenizers = import_extra(
        "tokenizers", "tokenizers", "--tokenizer", spec.kind, "a tokenizer.json"
    )
    return TokenizersCodec(tokenizers.Tokenizer.from_str(spec.json))


def token_dtype(vocab_size: int) -> np.dtype:
    """nanoGPT's uint16 while every id fits, else uint32; little-endian on any machine."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def encode_pieces(
    codec: Codec, texts: Sequence[str], ends: Sequence[bool], dtype: np.dtype
) -> np.ndarray:
    """The ids of consecutive pieces of text, with the end-of-text id after each piece that ends
    a document (when the codec has one), as one array of `dtype`."""
    parts = []
    eot = None if codec.eot is None else np.array([codec.eot], dtype=dtype)
    for ids, end in zip(codec.encode_many(texts), ends, strict=True):
        parts.append(ids.astype(dtype, copy=False))
        if end and eot is not None:
            parts.append(eot)
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def load_tokenizer_file(path: Path, key: str) -> TokenizerSpec:
    """A user's tokenizer.json (or a folder holding one, as a Hugging Face model has)."""
    if path.is_dir():
        path = path / TOKENIZER_FILE
    tokenizers = import_extra("tokenizers", "tokenizers", key, str(path), "a tokenizer.json")
    try:
        text = path.read_bytes().decode("utf-8")  # bytes: the copy must hash the same
        tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # OSError, UnicodeDecodeError, or tokenizers' bare Exception
        raise ConfigError(
            key, str(path), f"not a readable tokenizer.json ({first_line(e)})"
        ) from None
    return TokenizerSpec("tokenizers", json=text)


def train_bpe(texts: Iterable[str], vocab_size: int) -> TokenizerSpec:
    """GPT-2's recipe: a byte-level BPE (any text, no unknown token) with <|endoftext|>,
    learned from `texts` alone, so no download is needed."""
    tk = import_extra("tokenizers", "tokenizers", "--tokenizer", "bpe", "training a BPE")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=False,  # our own progress line counts the input read
    )
    tokenizer.train_from_iterator(texts, trainer)
    return TokenizerSpec("tokenizers", json=tokenizer.to_str())


def codec_from_meta(entry: Any, root: Path, key: str) -> Codec:
    """The codec a prepared directory's meta.json describes (its tokenizer.json checked against
    the recorded hash: a replaced file would decode samples into the wrong text)."""
    kind = entry.get("type") if isinstance(entry, dict) else None
    if kind == "char" and isinstance(entry.get("chars"), str):
        return CharCodec(entry["chars"])
    if kind == "bytes":
        return BytesCodec()
    if kind != "tokenizers":
        raise ConfigError(key, str(root / "meta.json"), f"unknown tokenizer entry {entry!r}")
    path = root / str(entry.get("file", TOKENIZER_FILE))
    if not path.is_file():
        raise ConfigError(key, str(path), "missing; meta.json names it as the tokenizer")
    spec = load_tokenizer_file(path, key)
    if entry.get("sha256") and spec.meta()["sha256"] != entry["sha256"]:
        raise ConfigError(
            key, str(path), "differs from the tokenizer meta.json recorded (sha256); re-run prepare"
        )
    return build_codec(spec)
