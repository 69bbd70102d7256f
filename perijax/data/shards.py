"""The on-disk format of a prepared dataset (docs/data.md): writing shards, reading the manifest,
and verifying checksums.

A dataset folder holds, per split (``train``, ``val``) and shard index ``NNNNN``:

* ``{split}-NNNNN.bin``: the token ids of the shard's documents back to back, each document
  followed by the end-of-document id; little-endian uint16 when the vocabulary has at most 65,536
  ids, else uint32. Memory-mappable as one flat array.
* ``{split}-NNNNN.idx``: little-endian int64 offsets, one per document plus a final one: document
  d is ``tokens[idx[d]:idx[d + 1]]`` (its last token is the end-of-document id).
* ``manifest.json``: tokenizer, dtype, counts and the sha256 and crc32c of every file; written
  last, so a folder without it is never a finished dataset. (crc32c is the checksum object stores
  keep of each object: a dataset read in place from `gs://` is checked against it for free.)
  ``tokenizer.json`` when the tokenizer is a file.

Files are written under a dot-prefixed temporary name and renamed when complete.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import google_crc32c
import numpy as np

FORMAT = "perijax-tokens"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS_DIR = ".progress"  # present while a preparation is unfinished
SPLITS = ("train", "val")
_READ_BLOCK = 8 << 20


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32 (both little-endian)."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def shard_names(split: str, index: int) -> tuple[str, str]:
    """(tokens file, offsets file) names of shard `index` of `split`."""
    return f"{split}-{index:05d}.bin", f"{split}-{index:05d}.idx"


def write_atomic(path: Path, data: bytes) -> None:
    """Writes `path` through a temporary sibling and a rename, so it is whole or absent."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: dict) -> None:
    write_atomic(path, (json.dumps(obj, indent=1) + "\n").encode())


class ShardWriter:
    """Streams the documents of one split of one shard to temporary files.

    `finish()` renames them to their final names and returns their manifest entry; until then
    only dot-prefixed ``.*.tmp-PID`` files exist.
    """

    def __init__(self, folder: Path, split: str, index: int, dtype: np.dtype):
        self._folder = folder
        self._names = shard_names(split, index)
        self._dtype = dtype
        self._offsets = [0]
        self._hash = hashlib.sha256()
        self._crc = google_crc32c.Checksum()
        self._file = None

    def _tmp(self, name: str) -> Path:
        return self._folder / f".{name}.tmp-{os.getpid()}"

    def add(self, ids: np.ndarray) -> None:
        """Appends one document: [n] ids, its end-of-document id already last."""
        if self._file is None:
            self._file = open(self._tmp(self._names[0]), "wb")
        data = np.asarray(ids).astype(self._dtype, copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._crc.update(data)
        self._offsets.append(self._offsets[-1] + len(ids))

    def finish(self) -> dict | None:
        """Moves the files into place; returns their entry, or None for an empty split."""
        if self._file is None:
            return None
        self._file.close()
        idx = np.asarray(self._offsets, "<i8").tobytes()
        write_atomic(self._tmp(self._names[1]), idx)  # fsynced; the rename below is the commit
        bin_name, idx_name = self._names
        os.replace(self._tmp(bin_name), self._folder / bin_name)
        os.replace(self._tmp(idx_name), self._folder / idx_name)
        return {
            "bin": bin_name,
            "idx": idx_name,
            "tokens": self._offsets[-1],
            "documents": len(self._offsets) - 1,
            "bin_sha256": self._hash.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
            "bin_crc32c": self._crc.digest().hex(),
            "idx_crc32c": google_crc32c.Checksum(idx).digest().hex(),
        }

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for name in self._names:
            self._tmp(name).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_READ_BLOCK):
            h.update(block)  # hashlib releases the GIL here, so threads verify in parallel
    return h.hexdigest()


def check_files(folder: Path, entries: list[dict], dtype: np.dtype, *, checksums: bool) -> None:
    """Raises ValueError naming the first shard file that is missing, has the wrong size, or
    (with `checksums`) the wrong sha256. Hashing runs on a few threads."""
    jobs = []
    for e in entries:
        for key in ("bin", "idx"):
            path, size = folder / e[key], expected_size(e, key, dtype)
            if not path.is_file():
                raise ValueError(f"shard file missing: {path}; the dataset is incomplete")
            if path.stat().st_size != size:
                raise ValueError(
                    f"shard file {path} has {path.stat().st_size} bytes, manifest says {size}: "
                    "the file is truncated or corrupt; prepare the dataset again"
                )
            jobs.append((path, e[f"{key}_sha256"]))
    if not checksums:
        return
    with concurrent.futures.ThreadPoolExecutor(min(4, os.cpu_count() or 1)) as pool:
        digests = pool.map(file_sha256, [path for path, _ in jobs])
        for (path, expected), actual in zip(jobs, digests, strict=True):
            if actual != expected:
                raise ValueError(
                    f"checksum mismatch in shard {path} (sha256 {actual[:12]}..., manifest "
                    f"{expected[:12]}...): the file is corrupt; prepare the dataset again"
                )


@dataclasses.dataclass(frozen=True)
class Shard:
    """One split of one shard: `tokens` ids in `bin_path`, `documents` offsets + 1 in idx_path."""

    bin_path: str
    idx_path: str
    tokens: int
    documents: int
    dtype: str


@dataclasses.dataclass(frozen=True)
class PreparedDataset:
    """A prepared dataset folder after its manifest and files were checked; `path` is a Path,
    or the URL (a str) of one read in place (perijax.data.remote)."""

    path: Path | str
    manifest: dict
    train: list[Shard]
    val: list[Shard]

    @property
    def tokenizer(self) -> dict:
        return self.manifest["tokenizer"]


def parse_manifest(text: str, where: str) -> dict:
    """The manifest in `text` (read from `where`), after its format and version are checked."""
    try:
        manifest = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where} is not valid JSON ({e})") from e
    if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{where} has format {manifest.get('format')!r} version "
            f"{manifest.get('format_version')}, expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    return manifest


def expected_size(entry: dict, key: str, dtype: np.dtype) -> int:
    """Bytes of the "bin" or "idx" file of a manifest shard entry."""
    return entry["tokens"] * dtype.itemsize if key == "bin" else (entry["documents"] + 1) * 8


def open_prepared(path: str | os.PathLike, *, verify: bool = True) -> PreparedDataset:
    """Reads DIR/manifest.json and checks every shard file's size (and sha256 with `verify`).

    Raises ValueError with a one-line message for a missing folder, an unfinished preparation,
    a foreign or newer format, and a missing, truncated or corrupt shard.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"prepared dataset not found: {folder}")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if (folder / PROGRESS_DIR).is_dir():
            raise ValueError(
                f"{folder} is an unfinished preparation (no {MANIFEST}): run the same "
                "`perijax prepare` command again to resume it"
            )
        raise ValueError(f"{folder} has no {MANIFEST}: not a dataset made by `perijax prepare`")
    manifest = parse_manifest(manifest_path.read_text(), str(manifest_path))
    dtype = np.dtype(manifest["dtype"])
    splits = {}
    for split in SPLITS:
        entries = manifest["splits"][split]["shards"]
        check_files(folder, entries, dtype, checksums=verify)
        splits[split] = [
            Shard(
                str(folder / e["bin"]),
                str(folder / e["idx"]),
                e["tokens"],
                e["documents"],
                dtype.str,
            )
            for e in entries
        ]
    return PreparedDataset(folder, manifest, splits["train"], splits["val"])


def local_copy(url: str, cache: Path) -> Path:
    """A prepared dataset at a URL (`gs://...`) copied to `cache/remote/<hash of the URL>/`:
    shards are read through np.memmap, which needs local files. The manifest is copied last and
    the copy is reused while it equals the remote manifest; `open_prepared` then checks the
    copy's sizes and checksums as for any local dataset."""
    from perijax import storage

    src = storage.as_path(url)
    try:
        text = (src / MANIFEST).read_text()
        manifest = json.loads(text)
        dest = cache / "remote" / hashlib.sha256(url.encode()).hexdigest()[:16]
        if (dest / MANIFEST).is_file() and (dest / MANIFEST).read_text() == text:
            return dest
        names = [
            e[key]
            for split in SPLITS
            for e in manifest["splits"][split]["shards"]
            for key in ("bin", "idx")
        ]
        if manifest.get("tokenizer", {}).get("file"):
            names.append(manifest["tokenizer"]["file"])
        (dest / MANIFEST).unlink(missing_ok=True)
        for name in names:
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            with (src / name).open("rb") as r, open(tmp, "wb") as w:
                shutil.copyfileobj(r, w, 1 << 24)
            os.replace(tmp, target)
        (dest / MANIFEST).write_text(text)
    except FileNotFoundError as e:
        raise ValueError(f"prepared dataset not found or incomplete at {url}: {e}") from e
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{url}/{MANIFEST} is not a perijax prepare manifest ({e})") from e
    return dest
