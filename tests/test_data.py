"""Tests for perijax.data: stdlib corpus preparation and cache, synthetic data, pickling of the
Grain source (the batch iterators: test_data_loader.py)."""

import hashlib
import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from perijax.data import (
    EOD_TOKEN,
    PackedWindows,
    TokenStream,
    corpus,
    load_token_data,
    stdlib_files,
)

REPO_ROOT = Path(__file__).resolve().parents[1]


def _completed(cache_dir: Path) -> list[Path]:
    """Cache folders that look finished (not dot-prefixed temp folders)."""
    return [p for p in cache_dir.iterdir() if not p.name.startswith(".")]


def _text(rel: str) -> str:
    root, _ = stdlib_files()
    return (root / rel).read_bytes().decode("utf-8", errors="replace")


# --- stdlib, BPE --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bpe512(tmp_path_factory):
    """The full stdlib corpus at vocab 512, prepared once for this module."""
    cache = tmp_path_factory.mktemp("cache")
    logs: list[str] = []
    data = load_token_data("stdlib", 512, cache_dir=str(cache), log=logs.append)
    (folder,) = _completed(cache)
    manifest = json.loads((folder / "manifest.json").read_text())
    return data, folder, manifest, logs


def test_stdlib_bpe_manifest(bpe512):
    data, folder, manifest, logs = bpe512
    assert any(line.startswith("preparing stdlib corpus") for line in logs)
    py = ".".join(map(str, sys.version_info[:3]))
    assert folder.name.startswith(f"stdlib-py{py}-bpe512-")
    assert sorted(p.name for p in folder.iterdir()) == [
        "manifest.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    assert manifest["format_version"] == corpus.FORMAT_VERSION
    assert manifest["source"] == "stdlib"
    assert manifest["tokenizer"] == "bpe"
    assert manifest["vocab_size"] == manifest["tokenizer_vocab_size"] == 512
    assert manifest["dtype"] == "uint16"
    assert data.name == "stdlib-bpe512" and data.vocab_size == 512
    _, files = stdlib_files()
    assert manifest["train_documents"] + manifest["val_documents"] == len(files)
    assert sum(size for _, size in files) > 5e6  # the real stdlib, not a stub


def test_stdlib_bpe_bins_match_manifest(bpe512):
    data, folder, manifest, _ = bpe512
    for split, arr in (("train", data.train), ("val", data.val)):
        path = folder / f"{split}.bin"
        assert isinstance(arr, np.memmap) and not arr.flags.writeable
        assert arr.dtype == np.uint16 and arr.size == manifest[f"{split}_tokens"]
        assert path.stat().st_size == 2 * manifest[f"{split}_tokens"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == manifest[f"{split}_sha256"]
        assert int(arr.max()) < data.vocab_size
        # One end-of-document token after every file.
        assert int((arr == data.eod_id).sum()) == manifest[f"{split}_documents"]
    assert 2.0 < manifest["train_bytes"] / manifest["train_tokens"] < 5.0  # BPE compresses


def test_stdlib_split_is_whole_disjoint_files(bpe512):
    _, _, manifest, _ = bpe512
    train, val = set(manifest["train_files"]), set(manifest["val_files"])
    assert train.isdisjoint(val)
    assert train | val == {rel for rel, _ in stdlib_files()[1]}
    assert not any(
        part in {"test", "tests", "site-packages"} for f in train for part in f.split("/")
    )
    share = manifest["val_bytes"] / (manifest["val_bytes"] + manifest["train_bytes"])
    assert 0.04 < share <= 0.05 + 1e-3


def test_stdlib_tokens_decode_to_source_files(bpe512):
    from tokenizers import Tokenizer

    data, _, manifest, _ = bpe512
    tokenizer = Tokenizer.from_file(data.tokenizer_path)
    assert tokenizer.get_vocab_size() == 512
    assert tokenizer.token_to_id(EOD_TOKEN) == data.eod_id
    sample = "def f(x):\n    return {'k': x ** 2}  # ünïcode\n"
    assert tokenizer.decode(tokenizer.encode(sample).ids) == sample
    # The first document of each split is exactly its first file.
    for split, arr in (("train", data.train), ("val", data.val)):
        end = int(np.argmax(arr == data.eod_id))
        assert tokenizer.decode(arr[:end].tolist()) == _text(manifest[f"{split}_files"][0])


def test_stdlib_second_call_uses_cache(bpe512):
    data, folder, _, _ = bpe512
    logs: list[str] = []
    start = time.perf_counter()
    again = load_token_data("stdlib", 512, cache_dir=str(folder.parent), log=logs.append)
    assert time.perf_counter() - start < 0.5
    assert not any("preparing" in line for line in logs)
    assert np.array_equal(again.train, data.train) and np.array_equal(again.val, data.val)


def test_cache_dir_defaults_to_env(tmp_path, monkeypatch):
    monkeypatch.setenv("PERIJAX_CACHE", str(tmp_path))
    load_token_data("stdlib", 257, max_files=5, log=lambda _: None)
    assert len(_completed(tmp_path)) == 1


# --- stdlib, bytes ------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, eod_id", [(256, None), (300, 256)])
def test_stdlib_bytes(tmp_path, vocab_size, eod_id):
    data = load_token_data(
        "stdlib", vocab_size, cache_dir=str(tmp_path), max_files=30, log=lambda _: None
    )
    (folder,) = _completed(tmp_path)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert data.name == f"stdlib-bytes{vocab_size}" and data.tokenizer_path is None
    assert data.eod_id == eod_id and manifest["tokenizer"] == "bytes"
    assert int(data.train.max()) < vocab_size
    docs = manifest["train_documents"]
    assert data.train.size == manifest["train_bytes"] + (docs if eod_id else 0)
    # Ids are the UTF-8 bytes of the files, in sorted order.
    expected = _text(manifest["train_files"][0]).encode()
    assert bytes(data.train[: len(expected)].astype(np.uint8)) == expected
    if eod_id is not None:
        assert data.train[len(expected)] == eod_id
        assert int((data.train == eod_id).sum()) == docs


def test_small_subset_gets_its_own_cache(tmp_path):
    load_token_data("stdlib", 257, cache_dir=str(tmp_path), max_files=10, log=lambda _: None)
    load_token_data("stdlib", 257, cache_dir=str(tmp_path), max_files=11, log=lambda _: None)
    assert len(_completed(tmp_path)) == 2  # the fingerprint covers the file list


def test_bad_arguments():
    with pytest.raises(ValueError, match="the minimum is 256"):
        load_token_data("stdlib", 255)
    with pytest.raises(ValueError) as err:
        load_token_data("c4", 1024)
    assert str(err.value) == "unknown data.source 'c4': expected one of stdlib, synthetic"


# --- atomic preparation -------------------------------------------------------------------


def test_interrupted_preparation_leaves_no_cache(tmp_path, monkeypatch):
    seen = {}

    def failing_train(texts, vocab_size):
        seen["entries"] = sorted(p.name for p in tmp_path.iterdir())
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(corpus, "_train_bpe", failing_train)
    with pytest.raises(RuntimeError, match="simulated crash"):
        load_token_data("stdlib", 512, cache_dir=str(tmp_path), max_files=20, log=lambda _: None)
    # Mid-preparation only a dot-prefixed temp folder existed; after the failure, nothing.
    (tmp_name,) = seen["entries"]
    assert tmp_name.startswith(".stdlib-") and ".tmp-" in tmp_name
    assert list(tmp_path.iterdir()) == []

    # A temp folder left by a killed run long ago is ignored, then cleaned up.
    stale = tmp_path / (tmp_name.split(".tmp-")[0] + ".tmp-1-dead")
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 10)
    os.utime(stale, (0, 0))
    monkeypatch.undo()
    data = load_token_data("stdlib", 512, cache_dir=str(tmp_path), max_files=20, log=lambda _: None)
    assert [p.name for p in tmp_path.iterdir()] == [tmp_name[1:].split(".tmp-")[0]]
    assert data.train.size > 0 and int(data.train.max()) < 512


def test_losing_a_preparation_race_keeps_the_winner(tmp_path, monkeypatch):
    # While this call is preparing, a "second process" finishes the same folder first.
    real_encode = corpus._encode_bytes
    kwargs = dict(cache_dir=str(tmp_path), max_files=10, log=lambda _: None)

    def encode_after_rival(texts, eod_id, dtype):
        if not _completed(tmp_path):
            monkeypatch.setattr(corpus, "_encode_bytes", real_encode)
            load_token_data("stdlib", 257, **kwargs)
            monkeypatch.setattr(corpus, "_encode_bytes", encode_after_rival)
        return real_encode(texts, eod_id, dtype)

    monkeypatch.setattr(corpus, "_encode_bytes", encode_after_rival)
    logs: list[str] = []
    data = load_token_data("stdlib", 257, **{**kwargs, "log": logs.append})
    assert any("another process prepared" in line for line in logs)
    assert len(list(tmp_path.iterdir())) == 1  # the loser's temp folder is gone
    assert data.train.size > 0


def test_two_processes_prepare_concurrently(tmp_path):
    code = (
        "import sys; from perijax.data import load_token_data; "
        "d = load_token_data('stdlib', 257, cache_dir=sys.argv[1], log=lambda _: None); "
        "print(d.train.size, d.val.size)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs[0] == outs[1]
    (folder,) = list(tmp_path.iterdir())
    manifest = json.loads((folder / "manifest.json").read_text())
    digest = hashlib.sha256((folder / "train.bin").read_bytes()).hexdigest()
    assert digest == manifest["train_sha256"]


# --- synthetic ----------------------------------------------------------------------------


def test_synthetic_is_deterministic_and_learnable(tmp_path):
    a = load_token_data("synthetic", 97, seed=1, cache_dir=str(tmp_path))
    b = load_token_data("synthetic", 97, seed=1, cache_dir=str(tmp_path))
    c = load_token_data("synthetic", 97, seed=2, cache_dir=str(tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert not np.array_equal(a.train, c.train)
    assert a.train.size >= 1_000_000 and a.val.size >= 50_000
    assert int(a.train.max()) < 97 and int(a.val.max()) < 97
    assert a.name == "synthetic" and a.tokenizer_path is None
    # Sparse transitions shared by both splits: within the chains of train and val together,
    # each token has at most 4 distinct successors (uniform next tokens would give ~97).
    chains = np.concatenate([a.train, a.val]).reshape(-1, corpus._CHAIN_LEN).astype(np.int64)
    pairs = np.unique(chains[:, :-1] * 97 + chains[:, 1:])
    assert np.bincount(pairs // 97, minlength=97).max() <= 4


# --- pickling (Grain worker processes) ---------------------------------------------------

SEQ = 8
TOKENS = np.arange(4096 * SEQ + 1, dtype=np.uint32)  # 64 KiB as uint16


def test_packed_windows_pickle_memmapped_parts_by_name(tmp_path):
    """A whole-file memmap part travels to a Grain worker as its file name; a view of one (not
    the whole file) as its data; both read back the same windows."""
    path = tmp_path / "t.bin"
    TOKENS.astype("<u2").tofile(path)
    mm = np.memmap(path, dtype="<u2", mode="r")
    offsets = np.array([0, len(mm)], np.int64)
    source = PackedWindows(TokenStream(arrays=[(mm, offsets)]), SEQ)
    blob = pickle.dumps(source)
    assert len(blob) < 2000  # the file name, not the 64 KiB of tokens
    restored = pickle.loads(blob)
    assert all(np.array_equal(restored[i], source[i]) for i in range(len(source)))
    view = mm[SEQ:]
    sliced = PackedWindows(TokenStream(arrays=[(view, np.array([0, len(view)], np.int64))]), SEQ)
    blob = pickle.dumps(sliced)
    assert len(blob) > view.nbytes  # a view: pickled as data
    assert np.array_equal(pickle.loads(blob)[0], source[1])
