"""Concatenate-and-split packing: a token stream over many shards and its fixed-length windows.

`TokenStream` lays its parts (shard files, memory-mapped on first use, or in-memory arrays) end
to end as one virtual 1-D array with document boundaries. `PackedWindows` cuts it into records
of ``seq_len + 1`` tokens starting every ``seq_len`` tokens (inputs ``window[:-1]``, targets
``window[1:]``); a window may span documents and shards, and `segment_ids` say which document
each position belongs to, for an optional document attention mask.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from perijax import storage
from perijax.data import remote
from perijax.data.shards import Shard


def doc_offsets_from_eod(tokens: np.ndarray, eod_id: int | None) -> np.ndarray:
    """[docs + 1] int64 offsets of a stream whose documents each end with `eod_id`.

    A trailing piece without an end-of-document token counts as a last document; with no
    `eod_id` the whole stream is one document.
    """
    n = len(tokens)
    if eod_id is None or n == 0:
        return np.array([0, n], np.int64)
    ends = np.flatnonzero(np.asarray(tokens) == eod_id) + 1
    if not len(ends) or ends[-1] != n:
        ends = np.append(ends, n)
    return np.concatenate([[0], ends]).astype(np.int64)


def _whole_file_memmap(a: np.ndarray) -> str | None:
    """The file name when `a` is an np.memmap of exactly its whole file, else None."""
    filename = getattr(a, "filename", None)
    if (
        isinstance(a, np.memmap)
        and filename is not None
        and a.offset == 0
        and a.flags.c_contiguous
        and os.path.getsize(filename) == a.nbytes
    ):
        return filename
    return None


class TokenStream:
    """Read-only concatenation of token parts with document offsets.

    Args:
      shards: prepared shard files, read through np.memmap when first touched (or by ranged
        reads when they are URLs: perijax.data.remote).
      arrays: or in-memory (or memmapped) parts, as (tokens [n], offsets [docs + 1]) pairs.
    Parts with no tokens are dropped. Documents never span parts.
    """

    def __init__(
        self,
        shards: Sequence[Shard] = (),
        arrays: Sequence[tuple[np.ndarray, np.ndarray]] = (),
    ):
        self._shards = [s for s in shards if s.tokens > 0]
        self._arrays = [(t, o) for t, o in arrays if len(t) > 0]
        if self._shards and self._arrays:
            raise ValueError("a TokenStream holds shard files or arrays, not both")
        sizes = [s.tokens for s in self._shards] + [len(t) for t, _ in self._arrays]
        docs = [s.documents for s in self._shards] + [len(o) - 1 for _, o in self._arrays]
        self._starts = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
        self._doc_base = np.concatenate([[0], np.cumsum(docs, dtype=np.int64)])
        self._loaded: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _part(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        part = self._loaded.get(p)
        if part is None:
            if self._arrays:
                part = self._arrays[p]
            else:
                s = self._shards[p]
                # Two threads may both open the same part; the second assignment is harmless.
                if storage.is_url(s.bin_path):  # read in place by ranged requests
                    part = remote.open_shard(s)
                else:
                    part = (
                        np.memmap(s.bin_path, dtype=np.dtype(s.dtype), mode="r"),
                        np.memmap(s.idx_path, dtype="<i8", mode="r"),
                    )
            self._loaded[p] = part
        return part

    def read(self, start: int, stop: int, *, segment_ids: bool = False):
        """tokens[start:stop] as [stop - start] int32; with `segment_ids`, also [stop - start]
        int32 document numbers counted from 1 at `start` (equal ids = same document)."""
        return self.read_many([(start, stop)], segment_ids=segment_ids)[0]

    def read_many(self, ranges: Sequence[tuple[int, int]], *, segment_ids: bool = False) -> list:
        """`read(start, stop)` of each range; the parts read in place from object storage are
        fetched by concurrent requests (remote.read_slices), the rest sliced from memory maps."""
        outs, segs, fetch, into = [], [], [], []
        for start, stop in ranges:
            if not 0 <= start <= stop <= len(self):
                raise IndexError(f"[{start}, {stop}) out of range [0, {len(self)}]")
            out = np.empty(stop - start, np.int32)
            seg = np.empty(stop - start, np.int64) if segment_ids else None
            pos = start
            p = int(np.searchsorted(self._starts, start, side="right")) - 1
            while pos < stop:
                tokens, offsets = self._part(p)
                local = pos - int(self._starts[p])
                n = min(stop, int(self._starts[p + 1])) - pos
                dst = slice(pos - start, pos - start + n)
                if isinstance(tokens, remote.RemoteArray):
                    fetch.append((tokens, local, local + n))
                    into.append((out, dst))
                else:
                    out[dst] = tokens[local : local + n]
                if seg is not None:
                    where = np.arange(local, local + n)
                    seg[dst] = offsets.searchsorted(where, side="right") - 1 + self._doc_base[p]
                pos += n
                p += 1
            outs.append(out)
            segs.append(seg)
        for (out, dst), data in zip(into, remote.read_slices(fetch), strict=True):
            out[dst] = data
        if not segment_ids:
            return outs
        for seg in segs:
            if len(seg):
                seg -= seg[0] - 1  # number the documents of this range from 1
        return [(out, seg.astype(np.int32)) for out, seg in zip(outs, segs, strict=True)]

    def __getstate__(self) -> dict:
        # Maps are re-opened after unpickling; whole-file memmaps travel as their file name.
        arrays = []
        for tokens, offsets in self._arrays:
            name = _whole_file_memmap(tokens)
            arrays.append(((name, tokens.dtype.str) if name else np.asarray(tokens), offsets))
        return {**self.__dict__, "_arrays": arrays, "_loaded": {}}

    def __setstate__(self, state: dict) -> None:
        arrays = []
        for tokens, offsets in state["_arrays"]:
            if isinstance(tokens, tuple):
                tokens = np.memmap(tokens[0], dtype=np.dtype(tokens[1]), mode="r")
            arrays.append((tokens, offsets))
        self.__dict__.update({**state, "_arrays": arrays})


class PackedWindows:
    """Grain random-access source: record i is stream[i*seq_len : i*seq_len + seq_len + 1].

    Records are [seq_len + 1] int32 arrays, or with `segment_ids` dicts
    {"tokens": [seq_len + 1] int32, "segment_ids": [seq_len + 1] int32}.
    """

    def __init__(self, stream: TokenStream, seq_len: int, segment_ids: bool = False):
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self._stream = stream
        self._seq_len = seq_len
        self._segment_ids = segment_ids

    def __len__(self) -> int:
        return max(0, (len(self._stream) - 1) // self._seq_len)

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self._seq_len
        stop = start + self._seq_len + 1
        if not self._segment_ids:
            return self._stream.read(start, stop)
        tokens, seg = self._stream.read(start, stop, segment_ids=True)
        return {"tokens": tokens, "segment_ids": seg}

    def read_many(self, indices: Sequence[int]):
        """Records `indices` stacked: [k, seq_len + 1] int32, or a dict of two such arrays with
        `segment_ids`; read together (concurrent requests for data read in place)."""
        for index in indices:
            if not 0 <= index < len(self):
                raise IndexError(f"window {index} out of range [0, {len(self)})")
        ranges = [(int(i) * self._seq_len, int(i) * self._seq_len + self._seq_len + 1)
                  for i in indices]  # fmt: skip
        rows = self._stream.read_many(ranges, segment_ids=self._segment_ids)
        if not self._segment_ids:
            return np.stack(rows) if rows else np.empty((0, self._seq_len + 1), np.int32)
        return {  # keys in sorted order, as Grain's batching of records gives them
            "segment_ids": np.stack([s for _, s in rows]),
            "tokens": np.stack([t for t, _ in rows]),
        }

    def __repr__(self) -> str:
        return f"PackedWindows({len(self._stream)} tokens, seq_len={self._seq_len})"
