"""Input side of `perijax prepare`: finding files, planning shards, and reading documents.

Formats (picked by file name; ``.gz`` may follow any of them):

* text (``.txt .text .md .rst``, and any explicitly named file of another suffix): one document
  per file, per blank-line-separated paragraph, or per line (``--text-unit``).
* JSON Lines (``.jsonl .ndjson``): one document per line, the string in ``--text-field``.
* Parquet (``.parquet``, needs ``pyarrow``): one document per row of the ``--text-field`` column.

A plan cuts the inputs into chunks of about ``--shard-mb`` of input; chunk i becomes shard i. Line
formats are cut at byte offsets (a chunk owns the lines that *start* in its range), Parquet at row
groups, other files stay whole. The plan depends only on the files and options, never on the
worker count, so the shards are the same however many workers write them.

Each document has a position key (its file's name and byte offset, row or paragraph number); a
hash of it decides the validation split, so the split is stable and independent of chunking.
"""

from __future__ import annotations

import dataclasses
import glob
import gzip
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
TEXT_UNITS = ("file", "paragraph", "line")
INVALID_UTF8 = ("replace", "skip")
_GLOB_CHARS = re.compile(r"[*?\[]")
# A blank line (possibly holding spaces) separates paragraphs; runs of them count once.
_PARAGRAPH_BREAK = re.compile(rb"\n(?:[ \t\r\f\v]*\n)+")
_VAL_SALT = b"perijax-val-v1\0"


class InputError(ValueError):
    """Bad input: the message is one line saying what and where."""


@dataclasses.dataclass(frozen=True)
class InputFile:
    """One input file. `name` is its path relative to the common folder of all inputs (the
    stable part of every document key); `size` is in bytes on disk."""

    path: str
    name: str
    format: str  # "text", "jsonl" or "parquet"
    gzip: bool
    size: int
    mtime_ns: int

    @property
    def key(self) -> str:
        """The name in document keys: without ".gz", so compressing a file keeps its split."""
        return self.name[:-3] if self.gzip else self.name


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one input file: byte range [start, stop) of a line format, row groups
    [start, stop) of a Parquet file, or the whole file (start=0, stop=size)."""

    file: int  # index into the input list
    start: int
    stop: int
    nbytes: int  # input bytes this piece stands for (for chunk sizes and MB/s)


@dataclasses.dataclass
class ReadStats:
    """Counts of documents that were dropped or altered, with the first place each happened."""

    empty: int = 0  # empty or whitespace-only documents, skipped
    invalid_utf8: int = 0  # documents with bytes that are not UTF-8 (replaced or skipped)
    malformed: int = 0  # JSON lines that do not parse or are not objects, skipped
    missing_field: int = 0  # JSON objects / Parquet rows without a string text field, skipped
    first: dict[str, str] = dataclasses.field(default_factory=dict)

    def add(self, what: str, where: str) -> None:
        setattr(self, what, getattr(self, what) + 1)
        self.first.setdefault(what, where)

    def merge(self, other: dict) -> None:
        for key in ("empty", "invalid_utf8", "malformed", "missing_field"):
            setattr(self, key, getattr(self, key) + other.get(key, 0))
        for key, where in other.get("first", {}).items():
            self.first.setdefault(key, where)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --- finding inputs -------------------------------------------------------------------------


def _format_of(path: str, explicit: bool, fmt: str) -> tuple[str | None, bool]:
    """(format, gzipped) of `path`; format None when a folder walk should skip the file."""
    name = path.lower()
    gz = name.endswith(".gz")
    if gz:
        name = name[:-3]
    if fmt != "auto":
        return fmt, gz
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl", gz
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet", gz
    if name.endswith(TEXT_SUFFIXES) or explicit:
        return "text", gz
    return None, gz


def find_inputs(patterns: list[str], fmt: str = "auto") -> tuple[list[InputFile], list[str]]:
    """Resolves files, folders (recursive) and globs into a sorted, de-duplicated file list.

    Returns (files, names of skipped empty files). Raises InputError for a path that does not
    exist, a glob or folder that matches no input file, or no non-empty input at all.
    """
    found: dict[str, tuple[str, bool]] = {}
    for pattern in patterns:
        matches: list[tuple[str, bool]] = []  # (path, named explicitly)
        if os.path.isfile(pattern):
            matches, what = [(pattern, True)], f"file {pattern}"
        elif os.path.isdir(pattern):
            for dirpath, dirnames, filenames in os.walk(pattern):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                matches += [(os.path.join(dirpath, f), False) for f in filenames if f[0] != "."]
            what = f"folder {pattern}"
        elif _GLOB_CHARS.search(pattern):
            matches = [(p, True) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
            what = f"glob {pattern!r}"
        else:
            raise InputError(f"input not found: {pattern} (no such file or folder)")
        kept = 0
        for path, explicit in matches:
            kind, gz = _format_of(path, explicit, fmt)
            if kind is not None:
                found.setdefault(os.path.realpath(path), (kind, gz))
                kept += 1
        if not kept:
            suffixes = " ".join(TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES)
            raise InputError(f"no input files in {what} (looked for {suffixes}, optionally .gz)")
    paths = sorted(found)
    root = os.path.commonpath(paths) if len(paths) > 1 else os.path.dirname(paths[0])
    files, empty = [], []
    for path in paths:
        st = os.stat(path)
        name = Path(os.path.relpath(path, root)).as_posix()
        if st.st_size == 0:
            empty.append(name)
            continue
        kind, gz = found[path]
        files.append(InputFile(path, name, kind, gz, st.st_size, st.st_mtime_ns))
    if not files:
        raise InputError(f"all {len(empty)} input files are empty: {', '.join(empty[:5])}")
    return files, empty


# --- planning -------------------------------------------------------------------------------


def plan_chunks(
    files: list[InputFile], *, shard_bytes: int, text_unit: str, text_field: str
) -> list[list[Piece]]:
    """Cuts the inputs into chunks of about `shard_bytes` input bytes, in file order."""
    pieces: list[Piece] = []
    for i, f in enumerate(files):
        line_based = f.format == "jsonl" or (f.format == "text" and text_unit == "line")
        if f.format == "parquet":
            pieces += _parquet_pieces(i, f, shard_bytes, text_field)
        elif line_based and not f.gzip and f.size > shard_bytes:
            # A gzip stream cannot be entered in the middle, so .gz files stay whole.
            for start in range(0, f.size, shard_bytes):
                stop = min(start + shard_bytes, f.size)
                pieces.append(Piece(i, start, stop, stop - start))
        else:
            pieces.append(Piece(i, 0, f.size, f.size))
    chunks: list[list[Piece]] = []
    current, size = [], 0
    for piece in pieces:
        if current and size + piece.nbytes > shard_bytes:
            chunks.append(current)
            current, size = [], 0
        current.append(piece)
        size += piece.nbytes
    if current:
        chunks.append(current)
    return chunks


def _parquet_module():
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "reading Parquet needs pyarrow: pip install pyarrow (or convert to .jsonl)"
        ) from None
    return pq


def _parquet_pieces(i: int, f: InputFile, shard_bytes: int, text_field: str) -> list[Piece]:
    """Row-group ranges of about `shard_bytes` (compressed bytes on disk, pro rata)."""
    pq = _parquet_module()
    try:
        meta = pq.ParquetFile(f.path).metadata
    except Exception as e:
        raise InputError(f"{f.name}: not a readable Parquet file ({first_line(e)})") from e
    columns = meta.schema.to_arrow_schema().names
    if text_field not in columns:
        raise InputError(
            f"{f.name}: no column {text_field!r} (columns: {', '.join(columns)}); set --text-field"
        )
    sizes = [meta.row_group(g).total_byte_size for g in range(meta.num_row_groups)]
    total = max(sum(sizes), 1)
    pieces, start, acc = [], 0, 0
    for g, size in enumerate(sizes):
        acc += size
        if acc * f.size / total >= shard_bytes or g == len(sizes) - 1:
            nbytes = round(acc * f.size / total)
            pieces.append(Piece(i, start, g + 1, nbytes))
            start, acc = g + 1, 0
    return pieces or [Piece(i, 0, 0, f.size)]


# --- reading --------------------------------------------------------------------------------


def is_val(name: str, position: int, val_fraction: float) -> bool:
    """Whether the document at (`name`, `position`) belongs to the validation split."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(_VAL_SALT + f"{name}\0{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < val_fraction * 2**64


def read_documents(
    f: InputFile,
    piece: Piece,
    *,
    text_unit: str,
    text_field: str,
    invalid_utf8: str,
    stats: ReadStats,
) -> Iterator[tuple[int, str]]:
    """Yields (position, text) for each document of `piece`; skipped ones are counted in
    `stats`. position: byte offset of the line, paragraph number, Parquet row, or 0."""
    if f.format == "parquet":
        yield from _parquet_documents(f, piece, text_field, invalid_utf8, stats)
        return
    if f.format == "jsonl" or text_unit == "line":
        for offset, line in _lines(f, piece):
            if not line.strip():
                continue  # blank lines are separators in line formats, not documents
            where = f"{f.name} at byte {offset}"
            if f.format == "text":
                text = _decode(line.rstrip(b"\r\n"), where, invalid_utf8, stats)
            else:
                text = _json_text(line, where, text_field, invalid_utf8, stats)
            if text is None:
                continue
            if text.strip():
                yield offset, text
            else:
                stats.add("empty", where)
        return
    data = _read_all(f)
    if text_unit == "file":
        text = _decode(data, f.name, invalid_utf8, stats)
        if text is not None:
            if text.strip():
                yield 0, text
            else:
                stats.add("empty", f.name)
        return
    for number, raw in enumerate(_PARAGRAPH_BREAK.split(data)):
        if raw.strip():
            text = _decode(raw, f"{f.name} paragraph {number}", invalid_utf8, stats)
            if text is not None:
                yield number, text


def first_line(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _open(f: InputFile):
    try:
        return gzip.open(f.path, "rb") if f.gzip else open(f.path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {f.path}: {e.strerror or first_line(e)}") from e


def _read_all(f: InputFile) -> bytes:
    with _open(f) as fh:
        try:
            return fh.read()
        except (OSError, EOFError) as e:  # e.g. a truncated or corrupt .gz
            raise InputError(f"cannot read {f.path}: {first_line(e)}") from e


def _lines(f: InputFile, piece: Piece) -> Iterator[tuple[int, bytes]]:
    """(offset, line) for the lines that start in [piece.start, piece.stop)."""
    # A .gz piece is always the whole file, and its offsets count decompressed bytes.
    stop = float("inf") if f.gzip else piece.stop
    with _open(f) as fh:
        offset = piece.start
        try:
            if offset > 0:
                # The line holding byte start-1 belongs to the previous piece (if that byte is
                # a newline, readline returns just it and the next line starts at `start`).
                fh.seek(offset - 1)
                offset += len(fh.readline()) - 1
            while offset < stop:
                line = fh.readline()
                if not line:
                    break
                yield offset, line
                offset += len(line)
        except (OSError, EOFError) as e:
            raise InputError(f"cannot read {f.path}: {first_line(e)}") from e


def _decode(data: bytes, where: str, invalid_utf8: str, stats: ReadStats) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.add("invalid_utf8", where)
        return None if invalid_utf8 == "skip" else data.decode("utf-8", errors="replace")


def _json_text(
    line: bytes, where: str, field: str, invalid_utf8: str, stats: ReadStats
) -> str | None:
    text = _decode(line, where, invalid_utf8, stats)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        stats.add("malformed", where)
        return None
    if not isinstance(record, dict):
        stats.add("malformed", where)
        return None
    value = record.get(field)
    if not isinstance(value, str):
        stats.add("missing_field", where)
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: not encodable text
        stats.add("invalid_utf8", where)
        if invalid_utf8 == "skip":
            return None
        value = value.encode("utf-8", "surrogatepass").decode("utf-8", errors="replace")
    return value


def _parquet_documents(
    f: InputFile, piece: Piece, field: str, invalid_utf8: str, stats: ReadStats
) -> Iterator[tuple[int, str]]:
    pq = _parquet_module()
    pf = pq.ParquetFile(f.path)
    row = sum(pf.metadata.row_group(g).num_rows for g in range(piece.start))
    for group in range(piece.start, piece.stop):
        values = pf.read_row_group(group, columns=[field]).column(0).to_pylist()
        for value in values:
            where = f"{f.name} row {row}"
            if isinstance(value, bytes):  # a binary column: decode like text files
                value = _decode(value, where, invalid_utf8, stats)
                if value is None:
                    row += 1
                    continue
            if not isinstance(value, str):
                stats.add("missing_field", where)
            elif not value.strip():
                stats.add("empty", where)
            else:
                yield row, value
            row += 1
