"""`open_datasets`: the trainer's entry point to every data source, and the resumable,
process-count-independent Grain training iterator.

The global stream is a pure function of (datasets, weights, seed, seq_len): global sample g of
component c is window ``shuffle_e(k)`` of c's packed training stream, where the mixture assigns
g to (c, k) by Grain's deterministic weighted interleave and e = k // (c's window count) is the
epoch (each epoch is a fresh permutation). Global batch s holds samples ``s*B ... s*B + B - 1``;
process p of P reads only rows ``p*b ... p*b + b - 1`` (b = B / P). The iterator state is the
number of global batches consumed, so it restores under any process count.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from perijax import storage
from perijax.config import DATA_REMOTE, DataConfig, TrainConfig
from perijax.data.corpus import EOD_TOKEN, TokenData, cache_root, load_token_data
from perijax.data.packing import PackedWindows, TokenStream, doc_offsets_from_eod
from perijax.data.remote import DataError, open_remote, read_object
from perijax.data.shards import PreparedDataset, local_copy, open_prepared, write_atomic
from perijax.data.tokenizer import BytesTokenizer, load_tokenizer

OPEN_SOURCES = ("stdlib", "synthetic", "prepared")
STATE_VERSION = 1


class _Member:
    """One dataset of a mixture: its train/val streams and its normalized weight."""

    def __init__(self, name: str, weight: float, train: TokenStream, val: TokenStream, key: str):
        self.name = name
        self.weight = weight
        self.train = train
        self.val = val
        self.key = key  # identifies the content, for checkpointed iterator states


class Datasets:
    """Train and validation data of one source or a weighted mixture of prepared datasets.

    Attributes:
      name: short label, e.g. "stdlib-bpe4096", "owt" or "mix(owt=0.7,code=0.3)".
      vocab_size: number of ids the tokenizer can produce (all ids are < vocab_size).
      train_tokens, val_tokens: tokens in the train / validation splits (all members).
      tokenizer: "bytes", "cl100k_base", "json" (a tokenizer.json), "bpe" (stdlib) or None.
      tokenizer_path: the tokenizer.json file, when the tokenizer is one.
      eod_id: the end-of-document id, or None when documents are not separated.
      identity: equal for two Datasets exactly when their ids mean the same tokens (the
        tokenizer's identity, as `perijax prepare` records it).
      members: [(name, weight)] of the mixture, one entry for a single dataset.
    """

    def __init__(
        self,
        *,
        name: str,
        vocab_size: int,
        tokenizer: str | None,
        tokenizer_path: str | None,
        eod_id: int | None,
        members: list[_Member],
        identity: str,
    ):
        self.name = name
        self.identity = identity
        self.vocab_size = vocab_size
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.eod_id = eod_id
        self._members = members
        self.members = [(m.name, m.weight) for m in members]
        self.train_tokens = sum(len(m.train) for m in members)
        self.val_tokens = sum(len(m.val) for m in members)
        self._key = hashlib.sha256(
            json.dumps([(m.key, m.weight) for m in members]).encode()
        ).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"Datasets({self.name!r}, vocab_size={self.vocab_size}, "
            f"train_tokens={self.train_tokens:,}, val_tokens={self.val_tokens:,})"
        )

    @classmethod
    def from_token_data(cls, data: TokenData) -> Datasets:
        """Wraps an in-memory or cached corpus (the stdlib and synthetic sources)."""
        train = TokenStream(arrays=[(data.train, doc_offsets_from_eod(data.train, data.eod_id))])
        val = TokenStream(arrays=[(data.val, doc_offsets_from_eod(data.val, data.eod_id))])
        # Content key: name + sizes + a sample of tokens (hashing all of stdlib would cost ~1 s).
        probe = np.asarray(data.train[:: max(1, len(data.train) // 4096)], np.int64).tobytes()
        key = f"{data.name}:{len(data.train)}:{hashlib.sha256(probe).hexdigest()[:16]}"
        kind, identity = None, f"synthetic:{data.vocab_size}"
        if data.tokenizer_path:
            kind = "bpe"
            identity = load_tokenizer(data.tokenizer_path, EOD_TOKEN).identity
        elif data.name.startswith("stdlib"):
            kind, identity = "bytes", BytesTokenizer.identity
            if data.eod_id != BytesTokenizer.eod_id:
                identity = "bytes:no-eod"
        return cls(
            name=data.name,
            vocab_size=data.vocab_size,
            tokenizer=kind,
            tokenizer_path=data.tokenizer_path,
            eod_id=data.eod_id,
            members=[_Member(data.name, 1.0, train, val, key)],
            identity=identity,
        )

    def streams(self, split: str) -> list[tuple[str, TokenStream]]:
        """[(member name, TokenStream)] of the "train" or "val" split, in mixture order."""
        return [(m.name, m.val if split == "val" else m.train) for m in self._members]

    # --- training -------------------------------------------------------------------------

    def train_iterator(
        self,
        *,
        seq_len: int,
        global_batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        num_threads: int = DataConfig.num_threads,
        prefetch: int = DataConfig.prefetch,
        with_segment_ids: bool = False,
    ) -> TrainIterator:
        """Endless shuffled training batches: this process's rows of each global batch.

        Args:
          seq_len: tokens per model input; rows hold seq_len + 1 (targets are shifted by one).
          global_batch_size: B, rows of a global batch over all processes.
          seed: in [0, 2**32); the same on every process.
          process_index, process_count: p and P (jax.process_index/count()); P must divide B.
          num_threads, prefetch: Grain read threads and local batches read ahead.
          with_segment_ids: yield {"tokens", "segment_ids"} dicts instead of arrays; segment
            ids number the documents in each row from 1 (see PackedWindows).

        Returns:
          A TrainIterator yielding [B / P, seq_len + 1] int32 arrays: rows p*b ... (p+1)*b - 1
          of global batch s (b = B / P), so concatenating all processes' arrays gives the
          global batch, whatever P is.
        """
        import grain  # imported on use: it takes ~0.8 s, which `perijax prepare` workers skip

        B, P = global_batch_size, process_count
        if B < 1 or P < 1 or B % P:
            raise ValueError(
                f"global_batch_size={B} must be a positive multiple of process_count={P}"
            )
        if not 0 <= process_index < P:
            raise ValueError(f"process_index={process_index} not in [0, {P})")
        if not 0 <= seed < 2**32:
            raise ValueError(f"seed={seed} must be in [0, 2**32)")
        if num_threads < 0 or prefetch < 0:
            raise ValueError(f"num_threads={num_threads} and prefetch={prefetch} must be >= 0")
        sources, parts = [], []
        for c, m in enumerate(self._members):
            source = PackedWindows(m.train, seq_len, with_segment_ids)
            needed = max(1, math.ceil(m.weight * B))  # windows in this member's share of a batch
            if len(source) < needed:
                share = f" ({m.weight:.0%} of it)" if len(self._members) > 1 else ""
                raise ValueError(
                    f"dataset {m.name} too small: a global batch of {B} x {seq_len + 1} tokens"
                    f"{share} needs {needed * seq_len + 1:,} train tokens, it has {len(m.train):,}"
                    f" (lower data.seq_len or global_batch_size, or add data)"
                )
            # Member 0 uses `seed` itself, so one dataset alone shuffles as `seed` says.
            member_seed = seed
            if c:
                member_seed = int(np.random.SeedSequence([seed, c]).generate_state(1)[0])
            # The pipeline orders (member, window) pairs; the windows are read per batch.
            windows = grain.MapDataset.range(len(source)).shuffle(seed=member_seed).repeat()
            parts.append(windows.map(functools.partial(_tag, c)))
            sources.append(source)
        if len(parts) == 1:
            samples = parts[0]
        else:
            samples = grain.MapDataset.mix(parts, [m.weight for m in self._members])
        b = B // P
        # Local batch r = s*P + p of size b holds global samples s*B + p*b + j: slicing after
        # batching makes each process read only its own rows.
        local = samples.batch(b, drop_remainder=True)[process_index::P]
        local = local.map(_BatchReader(sources))
        options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch)
        spec = {"dataset": self._key, "seed": seed, "seq_len": seq_len}
        return TrainIterator(iter(local.to_iter_dataset(options)), B, spec)

    # --- evaluation -----------------------------------------------------------------------

    def eval_batches(
        self, *, seq_len: int, batch_size: int, num_batches: int, with_segment_ids: bool = False
    ) -> list:
        """Held-out batches in a fixed order (no shuffle), the same on every process.

        Rows are consecutive windows of each member's validation stream; a mixture interleaves
        its members by weight (the same rule as training, without repetition).

        Returns:
          Up to `num_batches` [batch_size, seq_len + 1] int32 arrays (dicts with
          `with_segment_ids`); fewer when the split runs out, never a partial batch.
        """
        import grain

        if batch_size < 1 or num_batches < 1:
            raise ValueError(f"batch_size={batch_size} and num_batches={num_batches} must be >= 1")
        sources = [PackedWindows(m.val, seq_len, with_segment_ids) for m in self._members]
        for m, source in zip(self._members, sources, strict=True):
            if len(source) == 0:
                raise ValueError(
                    f"eval split of {m.name} too small: a window of seq_len={seq_len} needs "
                    f"{seq_len + 1} tokens, val has {len(m.val):,}"
                )
        rows = grain.MapDataset.source(sources[0])
        if len(sources) > 1:
            rows = grain.MapDataset.mix(
                [grain.MapDataset.source(s) for s in sources], [m.weight for m in self._members]
            )
        count = min(num_batches, len(rows) // batch_size)
        if count == 0:
            raise ValueError(
                f"eval split too small: one batch of {batch_size} windows of seq_len={seq_len} "
                f"needs {batch_size * seq_len + 1:,} tokens, val of {self.name} has "
                f"{self.val_tokens:,}"
            )
        batched = rows.batch(batch_size, drop_remainder=True)
        return [batched[j] for j in range(count)]


def _tag(member: int, window: int) -> tuple[int, int]:
    return member, window


class _BatchReader:
    """Reads a batch of (member, window) pairs: each member's windows together (one round of
    concurrent requests for data read in place), rows in batch order."""

    def __init__(self, sources: list[PackedWindows]):
        self._sources = sources

    def __call__(self, pairs: tuple[np.ndarray, np.ndarray]):
        members, windows = pairs
        if len(self._sources) == 1:
            return self._sources[0].read_many(windows)
        rows = [None] * len(windows)
        for c in np.unique(members):
            where = np.flatnonzero(members == c)
            got = self._sources[c].read_many(windows[where])
            for j, row in zip(where, _unstack(got), strict=True):
                rows[j] = row
        if isinstance(rows[0], dict):
            return {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        return np.stack(rows)


def _unstack(batch) -> list:
    if isinstance(batch, dict):
        return [dict(zip(batch, row, strict=True)) for row in zip(*batch.values(), strict=True)]
    return list(batch)


class TrainIterator:
    """The process-local view of the global training stream, with a global, resumable state.

    `get_state()` is JSON-serializable and the same on every process:
    ``{"global_batches": s, "global_samples": s * B, "global_batch_size": B, "seed": ...,
    "seq_len": ..., "dataset": key, "version": 1}``. `set_state()` accepts a state saved under any
    process count (and any global batch size that divides `global_samples`). Save it with the
    checkpoint as JSON (e.g. `ocp.args.JsonSave`); Grain's own checkpoint handler keys its files
    by process count, so it cannot restore under another one.
    """

    def __init__(self, it, global_batch_size: int, spec: dict):
        self._it = it
        self.global_batch_size = global_batch_size
        self._spec = spec

    def __iter__(self) -> TrainIterator:
        return self

    def __next__(self):
        try:
            return next(self._it)
        except DataError as e:  # Grain appends lines about its traceback filtering
            raise DataError(str(e).splitlines()[0]) from None

    def close(self) -> None:
        """Stops the read-ahead threads (batches being read are dropped)."""
        close = getattr(self._it, "close", None)
        if close is not None:
            close()

    def get_state(self) -> dict:
        s = int(self._it.get_state()["next_index"])
        return {
            "version": STATE_VERSION,
            "global_batches": s,
            "global_samples": s * self.global_batch_size,
            "global_batch_size": self.global_batch_size,
            **self._spec,
        }

    def set_state(self, state: dict) -> None:
        """Continues from `state` (from get_state, possibly of another process count)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data iterator state version {state.get('version')} is unknown")
        for key, value in self._spec.items():
            if state.get(key) != value:
                what = "the datasets or weights" if key == "dataset" else key
                raise ValueError(
                    f"data iterator state was saved with different {what} "
                    f"({state.get(key)!r} != {value!r}); it resumes only the same stream"
                )
        samples = int(state["global_samples"])
        if samples % self.global_batch_size:
            raise ValueError(
                f"data iterator state is at global sample {samples}, not a multiple of "
                f"global_batch_size={self.global_batch_size}"
            )
        inner = dict(self._it.get_state())
        inner["next_index"] = samples // self.global_batch_size
        self._it.set_state(inner)


# --- opening ------------------------------------------------------------------------------


def parse_mixture(path: str) -> list[tuple[str, float]]:
    """ "DIR" or "DIR_A=0.7,DIR_B=0.3" -> [(dir, normalized weight)]."""
    items = [item.strip() for item in path.split(",") if item.strip()]
    if not items:
        raise ValueError("data.path is empty: give a prepared dataset folder (perijax prepare)")
    if len(items) == 1 and "=" not in items[0]:
        return [(items[0], 1.0)]
    members = []
    for item in items:
        folder, sep, weight = item.rpartition("=")
        try:
            value = float(weight) if sep else float("nan")
        except ValueError:
            value = float("nan")
        if not sep or not folder or not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"bad mixture member {item!r} in data.path={path!r}: write DIR=WEIGHT with a "
                "positive weight for every member, e.g. DIR_A=0.7,DIR_B=0.3"
            )
        members.append((folder, value))
    names = [f if storage.is_url(f) else str(Path(f).resolve()) for f, _ in members]
    if len(set(names)) != len(names):
        raise ValueError(f"data.path={path!r} names a dataset twice")
    total = sum(w for _, w in members)
    return [(f, w / total) for f, w in members]


def _describe(tok: dict) -> str:
    return f"{tok['name']} ({tok['vocab_size']:,} ids)"


def open_datasets(
    source: str,
    *,
    path: str = DataConfig.path,
    vocab_size: int,
    seed: int = TrainConfig.seed,
    cache_dir: str | None = DataConfig.cache_dir,
    val_fraction: float = DataConfig.val_fraction,
    remote: str = DataConfig.remote,
    log: Callable[[str], None] = print,
    verify: bool = True,
) -> Datasets:
    """Opens the training and validation data of `source`.

    Args:
      source: "stdlib" or "synthetic" (corpus.load_token_data: prepared on first use), or
        "prepared": `path` is a folder written by `perijax prepare`, or a weighted mixture
        "DIR_A=0.7,DIR_B=0.3" (weights are normalized).
      vocab_size: the model's vocabulary; a dataset whose tokenizer has more ids is an error.
      seed: seeds the synthetic stream (the training shuffle takes its seed separately).
      cache_dir, val_fraction: for stdlib (prepared datasets hold a fixed validation split);
        cache_dir also holds the tokenizer file (and, with remote="copy", the local copy) of a
        prepared dataset given as a URL (`gs://...`).
      remote: how a prepared dataset at a URL is read: "stream" reads the windows in place by
        ranged requests (perijax.data.remote); "copy" copies it to cache_dir once, then reads
        the copy like a local folder.
      log: receives one-line messages.
      verify: check every shard's sha256 (reads all data once, in threads: docs/data.md has
        the cost); for a URL read in place, compare each object's stored crc32c with the
        manifest's instead (reads no data). Sizes are always checked.

    Raises:
      ValueError with a one-line message: unknown source, bad path or mixture, an unfinished
      or corrupt dataset (a missing, short or mismatched object: remote.DataError), a
      tokenizer larger than `vocab_size`, members of a mixture with different tokenizers.
    """
    if source in ("stdlib", "synthetic"):
        if path:
            raise ValueError(f"data.path={path!r} is only read when data.source='prepared'")
        data = load_token_data(
            source, vocab_size, cache_dir=cache_dir, val_fraction=val_fraction, seed=seed, log=log
        )
        return Datasets.from_token_data(data)
    if source != "prepared":
        raise ValueError(
            f"unknown data.source {source!r}: expected one of {', '.join(OPEN_SOURCES)}"
        )

    if remote not in DATA_REMOTE:
        raise ValueError(f"data.remote={remote!r}: expected one of {', '.join(DATA_REMOTE)}")
    opened: list[tuple[PreparedDataset, float]] = []
    tokenizer_files: list[str | None] = []
    for folder, weight in parse_mixture(path):
        t0 = time.perf_counter()
        checked = "sha256 verified" if verify else "sizes checked"
        if storage.is_url(folder) and remote == "stream":
            ds, note = open_remote(folder, verify=verify)
            if note:
                log(note)
            checked = "read in place, sizes checked"
            if verify and not note:
                checked = "read in place, sizes and crc32c checked"
        elif storage.is_url(folder):  # copied once into the local cache, then memory-mapped
            ds = open_prepared(local_copy(folder, cache_root(cache_dir)), verify=verify)
        else:
            ds = open_prepared(folder, verify=verify)
        tok = ds.tokenizer
        if tok["vocab_size"] > vocab_size:
            raise ValueError(
                f"dataset {folder} is tokenized with {_describe(tok)} but the model's vocab_size "
                f"is {vocab_size:,}: set model.vocab_size >= {tok['vocab_size']} or prepare it "
                "with a smaller tokenizer"
            )
        if opened and tok["identity"] != opened[0][0].tokenizer["identity"]:
            first = opened[0][0]
            raise ValueError(
                f"mixture members use different tokenizers: {first.path} has "
                f"{_describe(first.tokenizer)}, {folder} has {_describe(tok)}"
            )
        tokenizer_files.append(_tokenizer_file(ds, cache_root(cache_dir)))
        splits = ds.manifest["splits"]
        log(
            f"opened {folder}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} "
            f"val tokens in {len(ds.train)} shards, {_describe(tok)}, {checked} in "
            f"{time.perf_counter() - t0:.1f} s"
        )
        opened.append((ds, weight))

    members = [
        _Member(
            str(ds.path) if len(opened) > 1 else ds.manifest["name"],
            weight,
            TokenStream(shards=ds.train),
            TokenStream(shards=ds.val),
            ds.manifest["content_sha256"],
        )
        for ds, weight in opened
    ]
    first = opened[0][0]
    if len(opened) == 1:
        name = first.manifest["name"]
    else:
        name = "mix(" + ",".join(f"{ds.manifest['name']}={w:.2f}" for ds, w in opened) + ")"
    tok = first.tokenizer
    return Datasets(
        name=name,
        vocab_size=tok["vocab_size"],
        tokenizer=tok["kind"],
        tokenizer_path=tokenizer_files[0],
        eod_id=tok["eod_id"],
        members=members,
        identity=tok["identity"],
    )


def _tokenizer_file(ds: PreparedDataset, cache: Path) -> str | None:
    """The local tokenizer.json of a dataset, if its tokenizer is a file; one read in place
    from a URL is copied (a few MB at most) to cache/remote/<hash of its URL>/."""
    name = ds.tokenizer.get("file")
    if not name:
        return None
    if not storage.is_url(ds.path):
        return str(Path(ds.path) / name)
    source = f"{ds.path}/{name}"
    dest = cache / "remote" / hashlib.sha256(source.encode()).hexdigest()[:16] / name
    data = read_object(source)
    if not dest.is_file() or dest.read_bytes() != data:
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(dest, data)
    return str(dest)
