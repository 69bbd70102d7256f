"""Prepared datasets read in place (perijax.data.remote), through `file://` URLs: the same
fsspec calls as `gs://` (ranged `cat_file`, one listing) without an emulator. tests/test_gcs.py
repeats the main checks against the GCS emulator, with its crc32c."""

import json
import subprocess
import sys
from pathlib import Path

import google_crc32c
import numpy as np
import pytest
from test_checkpoint import BASE, _wait_for_step
from test_data_loader import _docs, _prepare

from perijax.data import DataError, open_datasets
from perijax.data import remote as remote_lib


def _url(folder) -> str:
    return f"file://{folder}"


def _open(path, cache, **kw):
    return open_datasets(
        "prepared", path=str(path), vocab_size=257, cache_dir=str(cache), log=lambda s: None, **kw
    )


@pytest.fixture(scope="module")
def words(tmp_path_factory):
    return _prepare(tmp_path_factory.mktemp("remote"), "words", _docs(0, 400, "abcdefghijklmno"))


def test_remote_array_slices_and_searchsorted_equal_numpy(tmp_path, monkeypatch):
    """Slices are ranged reads; searchsorted over many small cached blocks (7 items, 3 kept)
    equals np.searchsorted for runs of positions anywhere in the array, both sides."""
    monkeypatch.setattr(remote_lib, "OFFSETS_BLOCK", 7)
    monkeypatch.setattr(remote_lib, "OFFSETS_CACHE", 3)
    rng = np.random.default_rng(0)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 9, size=200))]).astype("<i8")
    (tmp_path / "a.idx").write_bytes(offsets.tobytes())
    arr = remote_lib.RemoteArray(
        remote_lib.RemoteFile(_url(tmp_path / "a.idx"), offsets.nbytes), "<i8", len(offsets)
    )
    assert (arr[13:77] == offsets[13:77]).all() and (arr[190:] == offsets[190:]).all()
    assert len(arr[5:5]) == 0
    for start in [0, 1, 6, 7, 8, 50, int(offsets[-1]) - 3, int(offsets[-1])]:
        where = np.arange(start, start + rng.integers(1, 60))
        for side in ("left", "right"):
            assert (arr.searchsorted(where, side) == np.searchsorted(offsets, where, side)).all()
    assert len(arr._blocks) <= 3


def test_in_place_reads_give_the_local_batches_and_only_this_hosts_rows(words, tmp_path):
    """Training (with and without segment ids) and eval batches equal the local folder's; the
    iterator state resumes across the two; process 0 of 2 reads exactly its rows' bytes; no
    shard is written to the cache."""
    cache = tmp_path / "cache"

    def batches(path, segment_ids: bool, **kw):
        ds = _open(path, cache)
        it = ds.train_iterator(
            seq_len=16, global_batch_size=4, seed=0, with_segment_ids=segment_ids,
            num_threads=0, prefetch=0, **kw,
        )  # fmt: skip
        train = [next(it) for _ in range(5)]
        evals = ds.eval_batches(
            seq_len=16, batch_size=4, num_batches=2, with_segment_ids=segment_ids
        )
        return train + evals

    for segment_ids in (False, True):
        want = batches(words, segment_ids)
        got = batches(_url(words), segment_ids)
        for a, b in zip(want, got, strict=True):
            a, b = (a, b) if segment_ids else ({"t": a}, {"t": b})
            assert all((a[k] == b[k]).all() for k in a)
    assert not cache.exists() or not any(cache.rglob("*.bin"))

    remote_lib.READS.reset()
    ds = _open(_url(words), cache)
    it = ds.train_iterator(
        seq_len=16, global_batch_size=4, seed=0, process_index=0, process_count=2,
        num_threads=0, prefetch=0,
    )  # fmt: skip
    mine = [next(it) for _ in range(6)]
    # 6 local batches of 2 rows of 17 uint16 tokens: the bytes of this host's rows, no more.
    assert remote_lib.READS.bytes == 6 * 2 * 17 * 2
    assert remote_lib.READS.requests >= 6 * 2
    state = it.get_state()
    local = _open(words, cache).train_iterator(
        seq_len=16, global_batch_size=4, seed=0, process_index=0, process_count=2
    )
    for m in mine:
        assert (next(local) == m).all()
    local.set_state(state)
    assert (next(local) == next(it)).all()


def test_prepare_records_the_crc32c_object_stores_keep(words):
    manifest = json.loads((words / "manifest.json").read_text())
    entry = manifest["splits"]["train"]["shards"][1]
    for key in ("bin", "idx"):
        data = (words / entry[key]).read_bytes()
        assert entry[f"{key}_crc32c"] == google_crc32c.Checksum(data).digest().hex()


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_bad_objects_are_one_line_errors_naming_them(words, tmp_path):
    """At open: no manifest, a missing shard, a shorter shard. Mid-read: a shard deleted or
    truncated after the open. Each is one DataError line naming the object."""
    with pytest.raises(DataError, match=r"not found or incomplete at file://.*: no manifest"):
        _open(_url(tmp_path), tmp_path / "c")
    bad = _copy(words, tmp_path / "missing")
    (bad / "train-00002.idx").unlink()
    with pytest.raises(DataError, match=r"^shard object missing: file://.*/train-00002\.idx;"):
        _open(_url(bad), tmp_path / "c")
    bad = _copy(words, tmp_path / "short")
    data = (bad / "val-00003.bin").read_bytes()
    (bad / "val-00003.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match=r"val-00003\.bin has [\d,]+ bytes, its manifest says"):
        _open(_url(bad), tmp_path / "c")

    for damage, message in [
        (lambda p: p.unlink(), r"^shard object missing: file://.*/train-0000\d\.bin;"),
        (lambda p: p.write_bytes(b"xy"), r"^shard object file://.*\.bin gave \d of \d+ bytes at"),
    ]:
        later = _copy(words, tmp_path / f"later{len(message)}")
        ds = _open(_url(later), tmp_path / "c")
        it = ds.train_iterator(seq_len=16, global_batch_size=4, seed=0)
        next(it)
        for f in later.glob("train-*.bin"):
            damage(f)
        with pytest.raises(DataError, match=message) as e:
            for _ in range(100):
                next(it)
        assert "\n" not in str(e.value)


@pytest.mark.slow
def test_an_object_gone_mid_run_stops_training_with_one_line(words, tmp_path):
    """`perijax train` on a dataset read in place whose shards are deleted while it runs: exit
    1 with one line naming the object; the checkpoints written before it are intact."""
    data = _copy(words, tmp_path / "data")
    overrides = {**BASE, "data.source": "prepared", "data.path": _url(data),
                 "model.vocab_size": "257", "train.total_steps": "100000",
                 "checkpoint.every_steps": "2",
                 "data.cache_dir": str(tmp_path / "cache")}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "perijax.cli", "train", "--workdir", str(tmp_path / "run"),
         *[f"--config.{k}={v}" for k, v in overrides.items()]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    try:
        _wait_for_step(proc, 4)
        for f in data.glob("train-*.bin"):
            f.unlink()
        proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 1, err
    finally:
        proc.kill()
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("perijax: error: shard object missing: file://"), err
    assert lines[-1].endswith("(the run stopped; a relaunch resumes from its last checkpoint)")
    assert not any("Traceback" in line for line in lines), err
    saved = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved, "the checkpoints written before the error are kept"
