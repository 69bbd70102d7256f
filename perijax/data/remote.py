"""Prepared datasets read in place from object storage (`gs://...`, any fsspec URL).

Nothing of the dataset is copied to local disk. Opening reads the manifest and lists the folder
once. That checks every shard object is present, has the size its manifest entry says, and
carries the crc32c that `perijax prepare` recorded. The crc32c is the checksum the object store
computed when the object was uploaded, so this check reads no data.

Reading is one ranged GET per window: a training window of seq_len + 1 tokens is exactly the
bytes it needs (two requests where it spans two shards). So a host reads only the rows of its
own share of each global batch. The windows of one batch are requested at once (`read_slices`:
parallel requests on the client's event loop), and read-ahead is the loader's: Grain's
`data.num_threads` threads read the next `data.prefetch` batches. A batch therefore costs about
one request round trip, not one per row.

Document offsets (the `.idx` files, read only for `data.document_masking`) are searched by
binary search over 32 KiB blocks, kept in a bounded per-file cache.
"""

from __future__ import annotations

import base64
import collections
import dataclasses
import threading
from typing import Any

import numpy as np

from perijax import storage
from perijax.data.inputs import first_line
from perijax.data.shards import (
    MANIFEST,
    SPLITS,
    PreparedDataset,
    Shard,
    expected_size,
    parse_manifest,
)

OFFSETS_BLOCK = 4096  # int64 offsets per cached block of an .idx file (32 KiB)
OFFSETS_CACHE = 256  # blocks kept per file (8 MiB)


class DataError(ValueError):
    """A dataset object that is missing, shorter than its manifest says, or unreadable; the
    message is one line naming the object."""


@dataclasses.dataclass
class ReadCounter:
    """Ranged requests and bytes read from object storage in this process (for tests and
    benchmarks: a host reads only its share)."""

    requests: int = 0
    bytes: int = 0
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False)

    def add(self, nbytes: int) -> None:
        with self.lock:
            self.requests += 1
            self.bytes += nbytes

    def reset(self) -> None:
        with self.lock:
            self.requests = self.bytes = 0


READS = ReadCounter()


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    return fsspec.core.url_to_fs(url)


class RemoteFile:
    """One object read by byte ranges; `size` is what the manifest says it holds."""

    def __init__(self, url: str, size: int):
        self.url = url
        self.size = size
        self._fs, self._path = _filesystem(url)

    def read(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop) of the object, all of them or a DataError."""
        if start >= stop:
            return b""
        try:
            data = self._fs.cat_file(self._path, start=start, end=stop)
        except OSError as e:
            data = e
        return self.check(data, start, stop)

    def check(self, data: bytes | BaseException, start: int, stop: int) -> bytes:
        """`data`, the answer to a read of [start, stop), if it is whole; else a DataError."""
        if isinstance(data, BaseException):
            if isinstance(data, OSError) and storage.is_missing(data):
                msg = f"shard object missing: {self.url}; upload the dataset again"
                raise DataError(msg) from data
            raise DataError(f"cannot read {self.url}: {first_line(data)}") from data
        READS.add(len(data))
        if len(data) != stop - start:
            raise DataError(
                f"shard object {self.url} gave {len(data):,} of {stop - start:,} bytes at byte "
                f"{start:,}: it is shorter than the {self.size:,} bytes its manifest says; "
                "upload the dataset again"
            )
        return data


def read_slices(items: list[tuple[RemoteArray, int, int]]) -> list[np.ndarray]:
    """array[lo:hi] for each (array, lo, hi), fetched concurrently: one `cat_ranges` call per
    file system, which object-storage clients (gcsfs) issue as parallel requests."""
    out: list[np.ndarray | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for k, (arr, _, _) in enumerate(items):
        groups.setdefault(id(arr.file._fs), []).append(k)
    for ks in groups.values():
        fs = items[ks[0]][0].file._fs
        files = [items[k][0].file for k in ks]
        sizes = [items[k][0].dtype.itemsize for k in ks]
        starts = [items[k][1] * size for k, size in zip(ks, sizes, strict=True)]
        stops = [items[k][2] * size for k, size in zip(ks, sizes, strict=True)]
        try:
            got = fs.cat_ranges([f._path for f in files], starts, stops, on_error="return")
        except OSError as e:  # the call itself failed (e.g. no connection)
            got = [e] * len(ks)
        for k, f, data, a, b in zip(ks, files, got, starts, stops, strict=True):
            out[k] = np.frombuffer(f.check(data, a, b), items[k][0].dtype)
    return out


class RemoteArray:
    """A read-only 1-D array in an object: slices are ranged reads; `searchsorted` (for
    sorted arrays such as document offsets) reads cached blocks of `OFFSETS_BLOCK` items."""

    def __init__(self, file: RemoteFile, dtype: np.dtype, length: int):
        self.file = file
        self.dtype = np.dtype(dtype)
        self._length = length
        self._blocks: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice):
            raise TypeError("a RemoteArray is read by slices")
        start, stop, step = index.indices(self._length)
        if step != 1:
            raise ValueError("a RemoteArray slice must be contiguous")
        stop = max(start, stop)
        size = self.dtype.itemsize
        return np.frombuffer(self.file.read(start * size, stop * size), self.dtype)

    def _block(self, j: int) -> np.ndarray:
        with self._lock:
            block = self._blocks.get(j)
            if block is not None:
                self._blocks.move_to_end(j)
                return block
        start = j * OFFSETS_BLOCK
        block = self[start : min(start + OFFSETS_BLOCK, self._length)]
        with self._lock:
            self._blocks[j] = block
            while len(self._blocks) > OFFSETS_CACHE:
                self._blocks.popitem(last=False)
        return block

    def searchsorted(self, values: np.ndarray, side: str = "left") -> np.ndarray:
        """np.searchsorted(self, values, side) for ascending `values`, reading only the blocks
        that hold the answer (and those of a binary search to find the first)."""
        values = np.asarray(values)
        if not len(values) or not self._length:
            return np.zeros(len(values), np.int64)
        below = (lambda a, v: a <= v) if side == "right" else (lambda a, v: a < v)
        lo, hi = 0, (self._length - 1) // OFFSETS_BLOCK
        while lo < hi:  # the last block whose first item lies below values[0] (or block 0)
            mid = (lo + hi + 1) // 2
            if below(self._block(mid)[0], values[0]):
                lo = mid
            else:
                hi = mid - 1
        blocks, last = [self._block(lo)], (self._length - 1) // OFFSETS_BLOCK
        j = lo
        while j < last and below(blocks[-1][-1], values[-1]):
            j += 1
            blocks.append(self._block(j))
        window = np.concatenate(blocks) if len(blocks) > 1 else blocks[0]
        return np.searchsorted(window, values, side=side) + lo * OFFSETS_BLOCK

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_blocks": collections.OrderedDict(), "_lock": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update({**state, "_lock": threading.Lock()})


def open_shard(shard: Shard) -> tuple[RemoteArray, RemoteArray]:
    """(tokens, offsets) of a shard whose files are URLs."""
    dtype = np.dtype(shard.dtype)
    tokens = RemoteFile(shard.bin_path, shard.tokens * dtype.itemsize)
    offsets = RemoteFile(shard.idx_path, (shard.documents + 1) * 8)
    return (
        RemoteArray(tokens, dtype, shard.tokens),
        RemoteArray(offsets, np.dtype("<i8"), shard.documents + 1),
    )


def _crc32c_hex(info: dict) -> str | None:
    """The object's crc32c as 8 hex digits, from a listing entry (GCS gives it base64)."""
    value = info.get("crc32c")
    if not value:
        return None
    try:
        return base64.b64decode(value).hex()
    except ValueError:
        return None


def open_remote(url: str, *, verify: bool = True) -> tuple[PreparedDataset, str | None]:
    """Opens the prepared dataset at `url` for reading in place.

    Reads the manifest and lists the folder once; checks that every shard object exists and
    has its manifest size, and with `verify` that its stored crc32c equals the manifest's.

    Returns:
      (dataset, note): `note` is a one-line remark when checksums could not be compared (a
      manifest written before crc32c was recorded, or a store that keeps none), else None.

    Raises:
      DataError (a ValueError) with one line naming the object: no manifest, a missing or
      short shard object, a crc32c mismatch.
    """
    url = url.rstrip("/")
    fs, root = _filesystem(url)
    where = f"{url}/{MANIFEST}"
    try:
        text = fs.cat_file(f"{root}/{MANIFEST}").decode()
    except OSError as e:
        if storage.is_missing(e):
            raise DataError(
                f"prepared dataset not found or incomplete at {url}: no {MANIFEST} (upload the "
                "whole folder `perijax prepare` wrote, manifest last)"
            ) from e
        raise DataError(f"cannot read {where}: {first_line(e)}") from e
    manifest = parse_manifest(text, where)
    try:
        listing = {
            info["name"].rstrip("/").rsplit("/", 1)[-1]: info
            for info in fs.ls(root, detail=True, refresh=True)
        }
    except OSError as e:
        raise DataError(f"cannot list {url}: {first_line(e)}") from e
    dtype = np.dtype(manifest["dtype"])
    unrecorded = unkept = 0
    splits = {}
    for split in SPLITS:
        shards = []
        for e in manifest["splits"][split]["shards"]:
            for key in ("bin", "idx"):
                name, size = e[key], expected_size(e, key, dtype)
                info = listing.get(name)
                if info is None:
                    raise DataError(
                        f"shard object missing: {url}/{name}; the dataset is incomplete "
                        "(upload it again)"
                    )
                if int(info.get("size", -1)) != size:
                    raise DataError(
                        f"shard object {url}/{name} has {int(info.get('size', -1)):,} bytes, "
                        f"its manifest says {size:,}: the object is truncated or not the one "
                        "`perijax prepare` wrote; upload it again"
                    )
                if not verify:
                    continue
                want, have = e.get(f"{key}_crc32c"), _crc32c_hex(info)
                unrecorded += want is None
                unkept += want is not None and have is None
                if want and have and want != have:
                    raise DataError(
                        f"checksum mismatch in shard object {url}/{name} (crc32c {have}, "
                        f"manifest {want}): it is not the file `perijax prepare` wrote; upload "
                        "it again"
                    )
            shards.append(
                Shard(f"{url}/{e['bin']}", f"{url}/{e['idx']}", e["tokens"], e["documents"],
                      dtype.str)
            )  # fmt: skip
        splits[split] = shards
    note = None
    if unrecorded:
        note = (
            f"note: {url}/{MANIFEST} records no crc32c for {unrecorded} shard files (written by "
            "an older `perijax prepare`): their sizes were checked, their contents were not. "
            "Prepare the dataset again, or set data.remote=copy to check sha256 on a local copy"
        )
    elif unkept:
        note = (
            f"note: the store of {url} keeps no crc32c for {unkept} shard objects: their sizes "
            "were checked, their contents were not (data.remote=copy checks sha256 on a local "
            "copy)"
        )
    return PreparedDataset(url, manifest, splits["train"], splits["val"]), note


def read_object(url: str) -> bytes:
    """The whole object at `url` (a small one: a tokenizer file)."""
    fs, path = _filesystem(url)
    try:
        return fs.cat_file(path)
    except OSError as e:
        raise DataError(f"cannot read {url}: {first_line(e)}") from e
