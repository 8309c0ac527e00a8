"""The inputs of `dist-train prepare` (text, JSONL, Parquet, a `datasets` dataset saved to disk)
read as a stream of text pieces of bounded size, so that no input needs to fit in memory, and
grouped into the batches that worker processes encode."""

from __future__ import annotations

import codecs
import glob
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from dist_train.errors import ConfigError, first_line, import_extra

BLOCK_BYTES = 1 << 20  # text files are read in blocks of this size, cut at the last newline
KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # text | jsonl | parquet | hf (any suffix not in KINDS is text)
    size: int  # bytes on disk, for the progress line

    def describe(self, field: str) -> dict[str, str]:
        entry = {"path": str(self.path.absolute()), "kind": self.kind}
        return entry if self.kind == "text" else {**entry, "field": field}


class Piece(NamedTuple):
    text: str
    ends_doc: bool  # the last piece of a document
    size: int  # input bytes read for it (progress only)


@dataclass
class Batch:
    """Consecutive pieces, encoded as one task: its bounds depend on the input alone, never on
    the number of workers, so the output bytes do not either."""

    texts: list[str]
    ends: list[bool]
    size: int


def expand_inputs(inputs: Iterable[str], key: str, out: Path) -> list[Source]:
    """Paths, folders (their files, sorted, recursively) and glob patterns -> sources. Nothing
    under `out` (prepare's output folder) is input: a folder or pattern skips it, so that a
    second run into `--out` inside an input folder does not read the first one's output back."""
    sources: list[Source] = []
    outside = _Outside(out)
    for given in inputs:
        path = Path(given)
        if path.exists():
            if not outside(path):
                why = f"is inside --out {out}; the output is never read as input"
                raise ConfigError(key, given, why)
            sources += _expand(path, key, outside)
        elif glob.has_magic(given):
            matches = [m for m in sorted(glob.glob(given, recursive=True)) if outside(Path(m))]
            if not matches:
                raise ConfigError(key, given, f"no file matches this pattern (outside {out})")
            for match in matches:
                sources += _expand(Path(match), key, outside)
        else:
            raise ConfigError(key, given, "no such file or directory")
    return sources


class _Outside:
    """Whether a path lies outside the output folder (links followed, as reading would)."""

    def __init__(self, out: Path) -> None:
        self.out = out.resolve()

    def __call__(self, path: Path) -> bool:
        return not path.resolve().is_relative_to(self.out)


def _expand(path: Path, key: str, outside: _Outside) -> list[Source]:
    if path.is_dir() and _is_saved_dataset(path):
        return [Source(path, "hf", sum(f.stat().st_size for f in path.rglob("*") if f.is_file()))]
    if path.is_dir():
        files = sorted(
            f for f in path.rglob("*") if f.is_file() and not f.name.startswith(".") and outside(f)
        )  # hidden files (.DS_Store, .gitignore) are not corpus
        if not files:
            raise ConfigError(key, str(path), "the directory holds no files")
        return [_file_source(f) for f in files]
    return [_file_source(path)]


def _file_source(path: Path) -> Source:
    return Source(path, KINDS.get(path.suffix.lower(), "text"), path.stat().st_size)


def _is_saved_dataset(path: Path) -> bool:
    """What `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` writes."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def read_source(source: Source, field: str) -> Iterator[Piece]:
    readers = {"text": _text, "jsonl": _jsonl, "parquet": _parquet, "hf": _saved_dataset}
    return readers[source.kind](source.path, field)


def _text(path: Path, _field: str) -> Iterator[Piece]:
    """A whole file is one document, read in blocks cut after their last newline (a BPE then
    sees whole lines); a line longer than 4 blocks is cut where the block ends."""
    decoder, carry, offset = codecs.getincrementaldecoder("utf-8")(), "", 0
    with open(path, "rb") as f:
        while True:
            block = f.read(BLOCK_BYTES)
            try:
                text = carry + decoder.decode(block, final=not block)
            except UnicodeDecodeError as e:  # e.start counts from the bytes held back before
                at = offset - len(decoder.getstate()[0]) + e.start
                raise ConfigError("INPUT", str(path), f"not UTF-8 text (at byte {at})") from None
            offset += len(block)
            if not block:
                yield Piece(text, True, 0)
                return
            cut = text.rfind("\n") + 1 or (len(text) if len(text) > 4 * BLOCK_BYTES else 0)
            carry = text[cut:]
            yield Piece(text[:cut], False, len(block))


def _jsonl(path: Path, field: str) -> Iterator[Piece]:
    """One JSON object per line, each a document; blank lines are skipped."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield Piece("", False, len(line))
                continue
            try:
                record = json.loads(line)
            except ValueError as e:  # UnicodeDecodeError included
                raise ConfigError("INPUT", f"{path}:{lineno}", f"not a JSON line ({e})") from None
            if not isinstance(record, dict):
                kind = type(record).__name__
                raise ConfigError("INPUT", f"{path}:{lineno}", f"a JSON {kind}, not an object")
            if field not in record:
                has = ", ".join(map(repr, record)) or "none"
                raise ConfigError(
                    "--field", field, f"{path}:{lineno} has no such field (it has {has})"
                )
            yield Piece(_text_value(record[field], f"{path}:{lineno}", field), True, len(line))


def _text_value(value: Any, where: str, field: str) -> str:
    if value is None:  # a missing value: an empty document, skipped
        return ""
    if not isinstance(value, str):
        raise ConfigError("--field", field, f"{where}: a {type(value).__name__}, not text")
    return value


def _parquet(path: Path, field: str) -> Iterator[Piece]:
    pq = import_extra("pyarrow.parquet", "parquet", "INPUT", str(path), "reading Parquet")
    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise ConfigError("INPUT", str(path), f"not a Parquet file ({first_line(e)})") from None
    _check_column(parquet.schema_arrow, field, path)
    rows = parquet.metadata.num_rows
    batches = (b.column(0) for b in parquet.iter_batches(batch_size=1024, columns=[field]))
    return _column_pieces(batches, rows, path.stat().st_size)


def _saved_dataset(path: Path, field: str) -> Iterator[Piece]:
    datasets = import_extra("datasets", "datasets", "INPUT", str(path), "a saved dataset")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise ConfigError("INPUT", str(path), f"not a loadable dataset ({first_line(e)})") from None
    if isinstance(ds, datasets.DatasetDict):
        splits = ", ".join(str(path / name) for name in ds)
        raise ConfigError("INPUT", str(path), f"a DatasetDict: give one split's folder ({splits})")
    _check_column(ds.data.schema, field, path)
    batches = (t.column(field) for t in ds.with_format("arrow").iter(batch_size=1024))
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return _column_pieces(batches, len(ds), size)


def _check_column(schema: Any, field: str, path: Path) -> None:
    import pyarrow as pa  # present: both callers just imported a module built on it

    if field not in schema.names:
        raise ConfigError(
            "--field", field, f"{path} has no such column (it has {', '.join(schema.names)})"
        )
    kind = schema.field(field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise ConfigError("--field", field, f"{path}: column {field!r} holds {kind}, not text")


def _column_pieces(columns: Iterable[Any], rows: int, size: int) -> Iterator[Piece]:
    """Documents of a text column, batch by batch; progress is the file share of rows done."""
    done = 0
    for column in columns:
        for text in column.to_pylist():
            yield Piece(text or "", bool(text), 0)
        before, done = done, done + len(column)
        yield Piece("", False, size * done // max(rows, 1) - size * before // max(rows, 1))


def documents(pieces: Iterable[Piece], newline: bool) -> Iterator[Piece]:
    """Makes document ends explicit: an empty document ends nothing (it vanishes), and with
    `newline` (char and bytes, which have no end-of-text id) every document ends with a
    newline, one being added where it lacks one."""
    last = ""  # the last character of the current document so far
    for text, ends_doc, size in pieces:
        last = text[-1] if text else last
        if ends_doc and not last:
            ends_doc = False
        elif ends_doc:
            text += "\n" if newline and last != "\n" else ""
            last = ""
        yield Piece(text, ends_doc, size)


def batches(pieces: Iterable[Piece], max_chars: int) -> Iterator[Batch]:
    """Pieces grouped into batches of about `max_chars` characters."""
    batch, chars = Batch([], [], 0), 0
    for text, ends_doc, size in pieces:
        batch.size += size
        if text or ends_doc:
            batch.texts.append(text)
            batch.ends.append(ends_doc)
            chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = Batch([], [], 0), 0
    if batch.texts or batch.size:
        yield batch
