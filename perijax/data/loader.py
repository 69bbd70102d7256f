"""Batch iterators over a 1-D token array: shuffled Grain training batches and fixed eval batches.

A record is a window of ``seq_len + 1`` consecutive tokens: inputs are ``window[:-1]`` and
targets ``window[1:]``. Windows start every ``seq_len`` tokens, so each token is a target once
per epoch and neighbouring windows share only their boundary token.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np


class WindowSource:
    """Grain random-access source: record i is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``.

    Module-level and picklable so Grain can hand it to worker processes. A whole-file np.memmap
    pickles as its file name and is re-opened on the other side instead of being copied.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int):
        if tokens.ndim != 1:
            raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self._tokens = tokens
        self._seq_len = seq_len

    def __len__(self) -> int:
        return max(0, (len(self._tokens) - 1) // self._seq_len)

    def __getitem__(self, index: int) -> np.ndarray:
        """[seq_len + 1] int32 window `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range [0, {len(self)})")
        start = index * self._seq_len
        return np.asarray(self._tokens[start : start + self._seq_len + 1], dtype=np.int32)

    def __repr__(self) -> str:
        return f"WindowSource({len(self._tokens)} tokens, seq_len={self._seq_len})"

    def __getstate__(self) -> dict:
        tokens = self._tokens
        filename = getattr(tokens, "filename", None)
        # Only a memmap that is exactly its whole file can be rebuilt from the name alone; a
        # slice or strided view of one is pickled as data.
        whole_file = (
            isinstance(tokens, np.memmap)
            and filename is not None
            and tokens.offset == 0
            and tokens.flags.c_contiguous
            and os.path.getsize(filename) == tokens.nbytes
        )
        if whole_file:
            return {"memmap": (filename, tokens.dtype.str), "seq_len": self._seq_len}
        return {"tokens": np.asarray(tokens), "seq_len": self._seq_len}

    def __setstate__(self, state: dict) -> None:
        if "memmap" in state:
            filename, dtype = state["memmap"]
            self._tokens = np.memmap(filename, dtype=np.dtype(dtype), mode="r")
        else:
            self._tokens = state["tokens"]
        self._seq_len = state["seq_len"]


def train_batches(
    tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    num_threads: int = 2,
    prefetch: int = 4,
) -> Iterator[np.ndarray]:
    """Endless shuffled batches of this process's share of the windows of `tokens`.

    Pipeline: WindowSource -> shuffle(seed) -> repeat() -> [process_index::process_count] ->
    batch. Shuffle sits before repeat, and Grain's repeat folds the epoch into the shuffle seed,
    so every epoch is a fresh permutation of all windows. The process slice comes after, so the
    processes split each epoch's permutation into disjoint interleaved shares.

    Args:
      tokens: [n] token ids (any integer dtype; np.memmap is read lazily).
      seq_len: tokens per model input; windows hold seq_len + 1.
      batch_size: windows per batch on this process (global batch / process_count).
      seed: shuffle seed in [0, 2**32); the same on every process.
      process_index, process_count: this process's slot (jax.process_index/count()).
      num_threads, prefetch: Grain read threads and batches prefetched ahead.

    Returns:
      A grain.DatasetIterator yielding [batch_size, seq_len + 1] int32 arrays. It supports
      get_state()/set_state(), so a checkpoint can save and resume the exact data position.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} must be in [0, 2**32) for Grain's shuffle")
    import grain  # here, not at the top: it takes ~0.8 s, and `perijax prepare` never needs it

    source = WindowSource(tokens, seq_len)
    needed = batch_size * process_count
    if len(source) < needed:
        raise ValueError(
            f"train split too small: {needed} windows of seq_len={seq_len} (batch_size="
            f"{batch_size} x {process_count} processes) need {needed * seq_len + 1} tokens, "
            f"got {len(tokens)}"
        )
    ds = (
        grain.MapDataset.source(source)
        .shuffle(seed=seed)
        .repeat()[process_index::process_count]
        .batch(batch_size, drop_remainder=True)
    )
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(options))


def eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, num_batches: int
) -> list[np.ndarray]:
    """The first `num_batches` batches of consecutive windows, in order, for a stable eval loss.

    Returns:
      A list of [batch_size, seq_len + 1] int32 arrays: batch j holds windows
      j*batch_size ... (j+1)*batch_size - 1. Fewer batches when `tokens` runs out (partial
      batches are dropped so every eval step has one shape).
    """
    if batch_size < 1 or num_batches < 1:
        raise ValueError(f"batch_size={batch_size} and num_batches={num_batches} must be >= 1")
    source = WindowSource(tokens, seq_len)
    count = min(num_batches, len(source) // batch_size)
    if count == 0:
        raise ValueError(
            f"eval split too small: one batch of {batch_size} windows of seq_len={seq_len} "
            f"needs {batch_size * seq_len + 1} tokens, got {len(tokens)}"
        )
    return [np.stack([source[j * batch_size + i] for i in range(batch_size)]) for j in range(count)]
