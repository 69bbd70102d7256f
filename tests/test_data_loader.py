"""Tests for `open_datasets` and its Grain training iterator (perijax.data.datasets): packing,
the seeded global shuffle, per-process rows, exact resume under another process count,
mixtures, document segment ids, eval batches, and the one-line errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from perijax.data import Datasets, PackedWindows, open_datasets, parse_mixture
from perijax.data.prepare import prepare

SEQ = 16
EOD = 256  # the bytes tokenizer's end-of-document id


def _docs(seed: int, n: int, alphabet: str) -> list[str]:
    rng = np.random.default_rng(seed)
    chars = list(alphabet)
    return [
        " ".join("".join(rng.choice(chars, size=rng.integers(1, 9))) for _ in range(k))
        for k in rng.integers(3, 60, size=n)
    ]


def _prepare(root: Path, name: str, docs: list[str]) -> Path:
    src = root / f"{name}.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = root / name
    prepare([str(src)], out, tokenizer="bytes", shard_mb=0.01, val_fraction=0.1, log=str)
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Three small byte-tokenized datasets whose rows tell their member apart by alphabet."""
    root = tmp_path_factory.mktemp("prepared")
    return {
        "words": _prepare(root, "words", _docs(0, 400, "abcdefghijklmnopqrstuvwxyz")),
        "digits": _prepare(root, "digits", _docs(1, 200, "0123456789")),
        "upper": _prepare(root, "upper", _docs(2, 200, "ABCDEFGHIJKLMNOPQRSTUVWXYZ")),
        "tiny": _prepare(root, "tiny", _docs(3, 40, "abcdefghijklmnopqrstuvwxyz")),
    }


def _open(folders, spec: str, **kwargs) -> Datasets:
    path = ",".join(
        f"{folders[k.split('=')[0]]}" + (f"={k.split('=')[1]}" if "=" in k else "")
        for k in spec.split(",")
    )
    return open_datasets("prepared", path=path, vocab_size=257, log=lambda s: None, **kwargs)


def _stream(folder: Path, split: str = "train") -> np.ndarray:
    manifest = json.loads((folder / "manifest.json").read_text())
    parts = [np.fromfile(folder / e["bin"], "<u2") for e in manifest["splits"][split]["shards"]]
    return np.concatenate(parts).astype(np.int32)


def _window_index(folder: Path) -> dict[bytes, int]:
    """Window content -> window number, for a stream whose windows are all distinct."""
    stream = _stream(folder)
    n = (len(stream) - 1) // SEQ
    index = {stream[i * SEQ : i * SEQ + SEQ + 1].tobytes(): i for i in range(n)}
    assert len(index) == n
    return index


def _batches(it, n: int) -> list:
    return [next(it) for _ in range(n)]


def _global(ds: Datasets, n: int, process_count: int, **kwargs) -> list:
    """n global batches assembled from `process_count` process iterators."""
    its = [
        ds.train_iterator(process_index=p, process_count=process_count, **kwargs)
        for p in range(process_count)
    ]
    return [_concat([next(it) for it in its]) for _ in range(n)]


def _concat(parts: list):
    if isinstance(parts[0], dict):
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return np.concatenate(parts)


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    return a.dtype == b.dtype and np.array_equal(a, b)


# --- packing and shuffle --------------------------------------------------------------------


def test_rows_are_packed_windows_of_the_train_stream(folders):
    ds = _open(folders, "words")
    manifest = json.loads((folders["words"] / "manifest.json").read_text())
    assert (
        ds.train_tokens == manifest["splits"]["train"]["tokens"] == len(_stream(folders["words"]))
    )
    assert (ds.vocab_size, ds.eod_id, ds.tokenizer, ds.tokenizer_path) == (257, EOD, "bytes", None)
    index = _window_index(folders["words"])
    it = ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=0)
    for batch in _batches(it, 5):
        assert batch.shape == (8, SEQ + 1) and batch.dtype == np.int32
        assert all(row.tobytes() in index for row in batch)
    # Windows cross shard boundaries: the stream has many shards, each window reads anywhere.
    assert len(manifest["splits"]["train"]["shards"]) > 5


def test_epochs_are_fresh_permutations_of_all_windows(folders):
    ds = _open(folders, "tiny")
    index = _window_index(folders["tiny"])
    n_windows, batch = len(index), 4
    it = ds.train_iterator(seq_len=SEQ, global_batch_size=batch, seed=0)
    per_epoch = n_windows // batch
    seen = [[index[r.tobytes()] for b in _batches(it, per_epoch) for r in b] for _ in range(2)]
    assert len(set(seen[0])) == len(seen[0]) == per_epoch * batch  # no repeats within an epoch
    assert seen[0] != seen[1]
    assert seen[0][:20] != sorted(seen[0][:20])  # shuffled, not in stream order


def test_same_seed_same_stream_whatever_the_threads(folders):
    ds = _open(folders, "words=0.7,digits=0.3")
    runs = [
        _batches(ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=3, **opts), 12)
        for opts in (
            {"num_threads": 0, "prefetch": 0},
            {"num_threads": 1},
            {"num_threads": 4, "prefetch": 16},
        )  # fmt: skip
    ]
    assert all(_equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run, strict=True))
    other = _batches(ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=4), 12)
    assert not all(_equal(a, b) for a, b in zip(runs[0], other, strict=True))


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_rows_concatenate_to_the_global_batch(folders, process_count):
    ds = _open(folders, "words=0.6,digits=0.4")
    kwargs = dict(seq_len=SEQ, global_batch_size=8, seed=1, with_segment_ids=True)
    single = _global(ds, 6, 1, **kwargs)
    split = _global(ds, 6, process_count, **kwargs)
    assert all(_equal(a, b) for a, b in zip(single, split, strict=True))
    one = next(ds.train_iterator(process_index=1, process_count=process_count, **kwargs))
    assert one["tokens"].shape == (8 // process_count, SEQ + 1)


def test_each_process_reads_only_its_own_rows(folders, monkeypatch):
    ds = _open(folders, "words")
    index = _window_index(folders["words"])
    kwargs = dict(seq_len=SEQ, global_batch_size=8, seed=0, process_count=2, prefetch=2)
    rows = {  # window numbers of each process's first 20 batches
        p: {
            index[r.tobytes()]
            for b in _batches(ds.train_iterator(process_index=p, **kwargs), 20)
            for r in b
        }  # fmt: skip
        for p in (0, 1)
    }
    assert rows[0].isdisjoint(rows[1]) and len(rows[0]) == 80
    # Record reads of sources made from here on (the iterators above still prefetch).
    read: list[int] = []
    created: list[PackedWindows] = []
    real_init, real_read = PackedWindows.__init__, PackedWindows.read_many

    def init(self, *args, **kw):
        real_init(self, *args, **kw)
        created.append(self)

    def read_many(self, indices):
        if any(self is c for c in created):
            read.extend(int(i) for i in indices)
        return real_read(self, indices)

    monkeypatch.setattr(PackedWindows, "__init__", init)
    monkeypatch.setattr(PackedWindows, "read_many", read_many)
    _batches(ds.train_iterator(process_index=0, num_threads=2, **kwargs), 3)
    assert 12 <= len(set(read)) and set(read) <= rows[0]


# --- resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("before, after", [(1, 1), (2, 1), (1, 2), (4, 2)])
def test_resume_is_bit_exact_under_another_process_count(folders, before, after):
    # A mixture with segment ids over several epochs of the small member: everything the
    # state must capture. Uninterrupted reference: 1 process, 40 global batches.
    ds = _open(folders, "tiny=0.5,digits=0.3,upper=0.2")
    kwargs = dict(seq_len=SEQ, global_batch_size=8, seed=7, with_segment_ids=True)
    reference = _global(ds, 40, 1, **kwargs)
    its = [
        ds.train_iterator(process_index=p, process_count=before, **kwargs) for p in range(before)
    ]
    first = [_concat([next(it) for it in its]) for _ in range(13)]
    states = [it.get_state() for it in its]
    assert all(s == states[0] for s in states)  # global, the same on every process
    assert states[0]["global_batches"] == 13 and states[0]["global_samples"] == 104
    state = json.loads(json.dumps(states[0]))  # as saved in a checkpoint
    resumed = [
        ds.train_iterator(process_index=p, process_count=after, **kwargs) for p in range(after)
    ]
    for it in resumed:
        it.set_state(state)
    rest = [_concat([next(it) for it in resumed]) for _ in range(27)]
    assert all(_equal(a, b) for a, b in zip(reference, first + rest, strict=True))


@pytest.mark.slow
def test_resume_in_fresh_processes(folders, tmp_path):
    """Two OS processes (a 2-host run) restore a 1-process state and continue the stream."""
    path = f"{folders['words']}=0.7,{folders['digits']}=0.3"
    kwargs = dict(seq_len=SEQ, global_batch_size=8, seed=5)
    ds = open_datasets("prepared", path=path, vocab_size=257, log=str)
    it = ds.train_iterator(**kwargs)
    reference = _batches(it, 10)
    it = ds.train_iterator(**kwargs)
    _batches(it, 4)
    (tmp_path / "state.json").write_text(json.dumps(it.get_state()))
    script = textwrap.dedent(f"""
        import json, sys, numpy as np
        from perijax.data import open_datasets
        p = int(sys.argv[1])
        ds = open_datasets("prepared", path={path!r}, vocab_size=257, log=str)
        it = ds.train_iterator(process_index=p, process_count=2, **{kwargs!r})
        it.set_state(json.load(open("state.json")))
        np.save(f"rows{{p}}.npy", np.stack([next(it) for _ in range(6)]))
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script, str(p)], cwd=tmp_path) for p in (0, 1)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    rows = [np.load(tmp_path / f"rows{p}.npy") for p in (0, 1)]
    assert np.array_equal(np.concatenate(rows, axis=1), np.stack(reference[4:]))


def test_set_state_refuses_another_stream(folders):
    ds = _open(folders, "words")
    state = ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=0).get_state()
    with pytest.raises(ValueError, match="saved with different seed"):
        ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=1).set_state(state)
    with pytest.raises(ValueError, match="saved with different the datasets or weights"):
        _open(folders, "words=0.5,digits=0.5").train_iterator(
            seq_len=SEQ, global_batch_size=8, seed=0
        ).set_state(state)
    # The state counts global samples, so another global batch size that divides the count
    # continues at the same sample.
    it = ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=0)
    _batches(it, 3)
    state = it.get_state()
    expected = np.concatenate(_batches(it, 2))  # global samples 24 ... 39
    narrow = ds.train_iterator(seq_len=SEQ, global_batch_size=4, seed=0)
    narrow.set_state(state)
    assert np.array_equal(np.concatenate(_batches(narrow, 4)), expected)
    with pytest.raises(ValueError, match="at global sample 24, not a multiple of .*=16"):
        ds.train_iterator(seq_len=SEQ, global_batch_size=16, seed=0).set_state(state)


# --- mixtures -------------------------------------------------------------------------------


def _member(row: np.ndarray) -> str:
    if ((row >= ord("0")) & (row <= ord("9"))).any():
        return "digits"
    if ((row >= ord("A")) & (row <= ord("Z"))).any():
        return "upper"
    return "words"


@pytest.mark.parametrize(
    "weights", [{"words": 0.7, "digits": 0.3}, {"words": 5, "digits": 3, "upper": 2}]
)
def test_mixture_proportions_over_10k_samples(folders, weights):
    spec = ",".join(f"{k}={w}" for k, w in weights.items())
    ds = _open(folders, spec)
    total = sum(weights.values())
    assert [w for _, w in ds.members] == pytest.approx([w / total for w in weights.values()])
    it = ds.train_iterator(seq_len=SEQ, global_batch_size=100, seed=0)
    counts = {k: 0 for k in weights}
    for batch in _batches(it, 100):
        for row in batch:
            counts[_member(row)] += 1
    for k, w in weights.items():
        assert abs(counts[k] / 10_000 - w / total) < 0.02, counts


def test_mixture_spec_parsing_and_errors(folders):
    a, b = str(folders["words"]), str(folders["digits"])
    assert parse_mixture(f"{a}=3,{b}=1") == [(a, 0.75), (b, 0.25)]
    assert parse_mixture(a) == [(a, 1.0)]
    for bad in (f"{a},{b}=1", f"{a}=0,{b}=1", f"{a}=x", f"{a}=-1,{b}=2"):
        with pytest.raises(ValueError, match=r"^bad mixture member .* write DIR=WEIGHT"):
            parse_mixture(bad)
    with pytest.raises(ValueError, match="names a dataset twice"):
        parse_mixture(f"{a}=1,{a}=1")
    with pytest.raises(ValueError, match="^prepared dataset not found: /no/such/dir$"):
        open_datasets("prepared", path="/no/such/dir", vocab_size=257)


# --- document boundaries --------------------------------------------------------------------


def test_segment_ids_mark_documents(folders):
    ds = _open(folders, "words")
    it = ds.train_iterator(seq_len=SEQ, global_batch_size=64, seed=0, with_segment_ids=True)
    plain = next(ds.train_iterator(seq_len=SEQ, global_batch_size=64, seed=0))
    batch = next(it)
    assert np.array_equal(batch["tokens"], plain)  # the same rows, plus segment ids
    tokens, seg = batch["tokens"], batch["segment_ids"]
    assert seg.dtype == np.int32 and (seg[:, 0] == 1).all()
    # A new document starts right after each end-of-document token, and only there.
    assert np.array_equal(np.diff(seg, axis=1), (tokens[:, :-1] == EOD).astype(np.int32))
    assert (seg > 1).any()


# --- eval -----------------------------------------------------------------------------------


def test_eval_batches_are_consecutive_held_out_windows(folders):
    ds = _open(folders, "words")
    val = _stream(folders["words"], "val")
    batches = ds.eval_batches(seq_len=SEQ, batch_size=4, num_batches=3)
    assert len(batches) == 3
    for j, b in enumerate(batches):
        assert b.shape == (4, SEQ + 1) and b.dtype == np.int32
        for i, row in enumerate(b):
            start = (j * 4 + i) * SEQ
            assert np.array_equal(row, val[start : start + SEQ + 1])
    assert len(ds.eval_batches(seq_len=SEQ, batch_size=4, num_batches=10**6)) == (
        (len(val) - 1) // SEQ // 4
    )
    mixed = _open(folders, "words=0.5,digits=0.5").eval_batches(
        seq_len=SEQ, batch_size=10, num_batches=2
    )
    again = _open(folders, "words=0.5,digits=0.5").eval_batches(
        seq_len=SEQ, batch_size=10, num_batches=2
    )
    assert all(np.array_equal(a, b) for a, b in zip(mixed, again, strict=True))
    assert sorted(_member(r) for r in mixed[0]) == ["digits"] * 5 + ["words"] * 5


# --- errors ---------------------------------------------------------------------------------


def test_sequence_longer_than_a_tiny_corpus(folders):
    ds = _open(folders, "tiny")
    n = ds.train_tokens
    with pytest.raises(ValueError) as err:
        ds.train_iterator(seq_len=4096, global_batch_size=8, seed=0)
    assert str(err.value) == (
        f"dataset tiny too small: a global batch of 8 x 4097 tokens needs 32,769 train tokens, "
        f"it has {n:,} (lower data.seq_len or global_batch_size, or add data)"
    )
    with pytest.raises(ValueError, match=r"^eval split of tiny too small: a window of "):
        ds.eval_batches(seq_len=4096, batch_size=2, num_batches=1)
    with pytest.raises(ValueError, match="must be a positive multiple of process_count=3"):
        ds.train_iterator(seq_len=SEQ, global_batch_size=8, seed=0, process_count=3)


def test_tokenizer_larger_than_the_model_vocab(folders):
    with pytest.raises(ValueError) as err:
        open_datasets("prepared", path=str(folders["words"]), vocab_size=256)
    assert str(err.value) == (
        f"dataset {folders['words']} is tokenized with bytes (257 ids) but the model's "
        "vocab_size is 256: set model.vocab_size >= 257 or prepare it with a smaller tokenizer"
    )


def test_builtin_sources_and_unknown_source(tmp_path):
    ds = open_datasets("synthetic", vocab_size=97, seed=1, log=str)
    assert (ds.name, ds.vocab_size, ds.eod_id) == ("synthetic", 97, None)
    batch = next(ds.train_iterator(seq_len=32, global_batch_size=4, seed=0, with_segment_ids=True))
    assert batch["tokens"].shape == (4, 33) and (batch["segment_ids"] == 1).all()
    again = open_datasets("synthetic", vocab_size=97, seed=1, log=str)
    assert _equal(
        next(ds.train_iterator(seq_len=32, global_batch_size=4, seed=0)),
        next(again.train_iterator(seq_len=32, global_batch_size=4, seed=0)),
    )
    with pytest.raises(ValueError, match=r"^unknown data.source 'c4': expected one of stdlib, "):
        open_datasets("c4", vocab_size=97)
    with pytest.raises(ValueError, match=r"data.path='x' is only read when data.source='prep"):
        open_datasets("synthetic", path="x", vocab_size=97)
