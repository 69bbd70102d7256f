"""Tokenize text, JSON Lines or Parquet into token shards (docs/data.md): `prepare()`, which
`perijax prepare` (perijax.cli.prepare) runs.

The inputs are planned into chunks (perijax.data.inputs); worker processes turn chunk i into
shard i (perijax.data.shards) and the main process records each finished shard under
DIR/.progress. An interrupted run resumes by skipping recorded shards whose files still verify.
manifest.json is written last, after every shard, so a folder without it is never mistaken for
a finished dataset. Bad input raises ValueError with a one-line message.

Over 500 lines on purpose: the resume protocol (the plan's hash, the per-shard progress records,
their verification, the manifest written last) runs through planning and the workers
alike, and one file keeps that invariant readable in one place.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

from perijax.data import inputs as inputs_lib
from perijax.data.inputs import InputError, InputFile, Piece, ReadStats
from perijax.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS_DIR,
    SPLITS,
    ShardWriter,
    check_files,
    token_dtype,
    write_json,
)
from perijax.data.tokenizer import EOD_TOKEN, load_tokenizer, train_bpe

DEFAULT_SHARD_MB = 64.0
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_TOKENIZER_TRAIN_MB = 100.0
_ENCODE_BATCH_CHARS = 1 << 20  # documents are tokenized in batches of about this much text
_PROGRESS_SECONDS = 2.0
_STAT_WARNINGS = {
    "empty": "empty documents were skipped",
    "invalid_utf8": "documents had bytes that are not UTF-8",
    "malformed": "JSON lines were not JSON objects and were skipped",
    "missing_field": "records had no string field {field!r} and were skipped",
}


def _warn(message: str) -> None:
    print(f"perijax: warning: {message}", file=sys.stderr, flush=True)


# --- worker side ----------------------------------------------------------------------------

_WORKER_TOKENIZERS: dict[tuple, object] = {}


def _init_worker(parallel_workers: bool) -> None:
    if parallel_workers:
        # Each worker is one process: the tokenizers library's own thread pool would only
        # oversubscribe the cores the other workers use.
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _tokenizer_for(spec: tuple):
    tok = _WORKER_TOKENIZERS.get(spec)
    if tok is None:
        tok = _WORKER_TOKENIZERS[spec] = load_tokenizer(spec[0], spec[1])
    return tok


def _documents(
    pieces: Iterable[Piece], files: Sequence[InputFile] | dict[int, InputFile], options: dict, stats
) -> Iterator[tuple[str, str]]:
    """(split, text) of every document of `pieces`, in order; split is "val" for the held-out
    ones. `options` holds the reading options (text_unit, text_field, invalid_utf8) and
    val_fraction; `stats` (a ReadStats) counts what was read."""
    for piece in pieces:
        f = files[piece.file]
        docs = inputs_lib.read_documents(
            f,
            piece,
            text_unit=options["text_unit"],
            text_field=options["text_field"],
            invalid_utf8=options["invalid_utf8"],
            stats=stats,
        )
        for position, text in docs:
            held_out = inputs_lib.is_val(f.key, position, options["val_fraction"])
            yield ("val" if held_out else "train"), text


def prepare_chunk(task: dict) -> dict:
    """Tokenizes one chunk into shard `task["index"]` (train and val files); returns its record.

    Module-level so that spawned worker processes can unpickle it by name.
    """
    t0 = time.perf_counter()
    tok = _tokenizer_for(task["tokenizer"])
    out, index = Path(task["out"]), task["index"]
    dtype = np.dtype(task["dtype"])
    files: dict[int, InputFile] = task["files"]
    stats = ReadStats()
    writers = {split: ShardWriter(out, split, index, dtype) for split in SPLITS}
    pending: dict[str, list[str]] = {split: [] for split in SPLITS}
    pending_chars = dict.fromkeys(SPLITS, 0)
    text_bytes = dict.fromkeys(SPLITS, 0)
    eod = np.array([tok.eod_id], np.int64)

    def flush(split: str) -> None:
        for ids in tok.encode_batch(pending[split]):
            writers[split].add(np.concatenate([ids, eod]))
        pending[split], pending_chars[split] = [], 0

    try:
        for split, text in _documents(task["pieces"], files, task, stats):
            pending[split].append(text)
            pending_chars[split] += len(text)
            text_bytes[split] += len(text.encode("utf-8", "surrogatepass"))
            if pending_chars[split] >= _ENCODE_BATCH_CHARS:
                flush(split)
        for split in SPLITS:
            flush(split)
        shards = {split: writers[split].finish() for split in SPLITS}
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {
        "index": index,
        "shards": shards,
        "text_bytes": text_bytes,
        "input_bytes": sum(p.nbytes for p in task["pieces"]),
        "stats": stats.to_dict(),
        "seconds": time.perf_counter() - t0,
    }


# --- main side ------------------------------------------------------------------------------


class _Progress:
    """Throttled one-line progress: shards, documents, tokens, input MB and MB/s."""

    def __init__(self, total: int, log: Callable[[str], None]):
        self.total, self.log = total, log
        self.done = self.docs = self.tokens = 0
        self.input_bytes = 0  # read in this run (resumed shards excluded), for MB/s
        self.t0 = self.last = time.perf_counter()

    def add(self, record: dict, resumed: bool = False) -> None:
        self.done += 1
        for entry in record["shards"].values():
            if entry:
                self.docs += entry["documents"]
                self.tokens += entry["tokens"]
        if resumed:
            return
        self.input_bytes += record["input_bytes"]
        now = time.perf_counter()
        if now - self.last >= _PROGRESS_SECONDS or self.done == self.total:
            self.last = now
            self.log(self.line())

    def rate(self) -> float:
        return self.input_bytes / 1e6 / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        return (
            f"prepare: {self.done}/{self.total} shards  {self.docs:,} docs  "
            f"{self.tokens:,} tokens  {self.input_bytes / 1e6:,.1f} MB in {self.rate():.2f} MB/s"
        )


@contextlib.contextmanager
def _locked(progress_dir: Path):
    """Holds an exclusive lock on DIR/.progress/lock, so two runs never write one folder."""
    with open(progress_dir / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise InputError(
                f"another `perijax prepare` is writing {progress_dir.parent} right now"
            ) from None
        yield  # the lock goes with the file when it closes


def _plan_sha(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()


def _clear(out: Path) -> None:
    """Removes a previous dataset's files from `out`, the manifest first."""
    (out / MANIFEST).unlink(missing_ok=True)
    for pattern in ("train-*.bin", "train-*.idx", "val-*.bin", "val-*.idx", "tokenizer.json"):
        for path in out.glob(pattern):
            path.unlink()
    shutil.rmtree(out / PROGRESS_DIR, ignore_errors=True)


def _check_out(out: Path, plan_sha: str, overwrite: bool) -> str:
    """Decides what to do with the output folder: "new", "resume" or "complete"."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder")
    if (out / MANIFEST).is_file():
        try:
            same = json.loads((out / MANIFEST).read_text()).get("plan_sha256") == plan_sha
        except ValueError:
            same = False
        if overwrite:
            _clear(out)
            return "new"
        if same:
            return "complete"
        raise InputError(
            f"{out} already holds a dataset prepared from other inputs or options: pass "
            "--overwrite to replace it, or choose another --out"
        )
    plan_file = out / PROGRESS_DIR / "plan.json"
    if plan_file.is_file():
        try:
            same = json.loads(plan_file.read_text()).get("plan_sha256") == plan_sha
        except ValueError:
            same = False
        if same and not overwrite:
            return "resume"
        if overwrite:
            _clear(out)
            return "new"
        raise InputError(
            f"{out} holds an unfinished preparation of other inputs or options: pass "
            "--overwrite to start over, or choose another --out"
        )
    if out.is_dir() and any(out.iterdir()):
        raise InputError(
            f"--out {out} is not empty and holds no perijax dataset: choose a new folder"
        )
    return "new"


def _verify_record(out: Path, record: dict, dtype: np.dtype) -> str | None:
    """Why a recorded shard cannot be reused, or None when its files verify."""
    entries = [e for e in record["shards"].values() if e]
    try:
        check_files(out, entries, dtype, checksums=True)
    except ValueError as e:
        return str(e)
    return None


def _train_tokenizer(
    out: Path,
    files: list[InputFile],
    chunks: list[list[Piece]],
    options: dict,
    vocab_size: int,
    budget_bytes: int,
    log: Callable[[str], None],
) -> None:
    """Trains a byte-level BPE on the first `budget_bytes` of training documents and writes
    out/tokenizer.json; reuses a finished one of the same plan on resume."""
    record = out / PROGRESS_DIR / "tokenizer.json"
    path = out / "tokenizer.json"
    if record.is_file() and path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if json.loads(record.read_text())["sha256"] == digest:
            log(f"resuming: reusing the trained tokenizer {path}")
            return
    t0 = time.perf_counter()
    texts, used, stats = [], 0, ReadStats()
    pieces = (piece for chunk in chunks for piece in chunk)
    for split, text in _documents(pieces, files, options, stats):
        if split == "train":
            texts.append(text)
            used += len(text.encode("utf-8", "surrogatepass"))
            if used >= budget_bytes:
                break
    if not texts:
        raise InputError("no training documents to train the tokenizer on")
    tokenizer = train_bpe(texts, vocab_size)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tokenizer.save(str(tmp))
    os.replace(tmp, path)
    write_json(record, {"sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    log(
        f"trained a {tokenizer.get_vocab_size()}-token BPE on {len(texts):,} documents "
        f"({used / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f} s"
    )


def prepare(
    inputs: list[str],
    out: str | os.PathLike,
    *,
    tokenizer: str = "cl100k_base",
    train_tokenizer: int = 0,
    tokenizer_train_mb: float = DEFAULT_TOKENIZER_TRAIN_MB,
    eod_token: str | None = None,
    fmt: str = "auto",
    text_field: str = "text",
    text_unit: str = "file",
    val_fraction: float = DEFAULT_VAL_FRACTION,
    invalid_utf8: str = "replace",
    shard_mb: float = DEFAULT_SHARD_MB,
    workers: int = 1,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] = _warn,
) -> dict:
    """Prepares (or resumes preparing) the dataset `out` from `inputs`; returns its manifest.

    Args mirror the command's flags (`perijax prepare --help`). Raises InputError (a
    ValueError) with a one-line message for bad input; nothing is presented as complete then.
    """
    t_start = time.perf_counter()
    # --- options and inputs: checked before anything is written.
    _check_options(val_fraction, workers, shard_mb, text_unit, invalid_utf8, train_tokenizer)
    out = Path(out)
    files, empty = inputs_lib.find_inputs(list(inputs), fmt)
    if empty:
        more = f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""
        warn(f"skipped {len(empty)} empty input file(s): {', '.join(empty[:5])}{more}")
    tok = None
    if not train_tokenizer:
        tok = load_tokenizer(tokenizer, eod_token)
    shard_bytes = max(1, int(shard_mb * 1e6))
    chunks = inputs_lib.plan_chunks(
        files, shard_bytes=shard_bytes, text_unit=text_unit, text_field=text_field
    )
    options = {
        "text_field": text_field,
        "text_unit": text_unit,
        "val_fraction": val_fraction,
        "invalid_utf8": invalid_utf8,
    }
    tokenizer_plan = (
        {"train_bpe": train_tokenizer, "train_mb": tokenizer_train_mb}
        if train_tokenizer
        else {"identity": tok.identity}
    )
    plan = {
        "format_version": FORMAT_VERSION,
        "files": [[f.name, f.format, f.gzip, f.size, f.mtime_ns] for f in files],
        "chunks": [[[p.file, p.start, p.stop] for p in chunk] for chunk in chunks],
        "options": options,
        "tokenizer": tokenizer_plan,
    }
    plan_sha = _plan_sha(plan)

    # --- output folder: new, resumed, or already complete.
    state = _check_out(out, plan_sha, overwrite)
    if state == "complete":
        return _complete_manifest(out, log)
    progress_dir = out / PROGRESS_DIR
    progress_dir.mkdir(parents=True, exist_ok=True)
    with _locked(progress_dir):  # one run per folder at a time
        for leftover in out.glob(".*.tmp-*"):  # temp files of a killed run
            leftover.unlink()
        write_json(progress_dir / "plan.json", {"plan_sha256": plan_sha, "plan": plan})
        total_mb = sum(f.size for f in files) / 1e6
        log(
            f"prepare: {len(files)} input files, {total_mb:,.1f} MB -> {len(chunks)} shards in "
            f"{out} ({'resuming' if state == 'resume' else 'new'}, {workers} worker(s))"
        )

        # --- tokenizer: trained on the training split, or copied in when it is a file.
        if train_tokenizer:
            budget = int(tokenizer_train_mb * 1e6)
            _train_tokenizer(out, files, chunks, options, train_tokenizer, budget, log)
            tok = load_tokenizer(str(out / "tokenizer.json"))
        elif tok.kind == "json" and Path(tok.path).resolve() != (out / "tokenizer.json").resolve():
            shutil.copyfile(tok.path, progress_dir / "tokenizer.json.copy")
            os.replace(progress_dir / "tokenizer.json.copy", out / "tokenizer.json")
        if tok.kind == "json":
            tok_spec = (str(out / "tokenizer.json"), tok.eod_token)
        else:
            tok_spec = (tok.kind, None)
        dtype = token_dtype(tok.vocab_size)

        # --- shards: reuse recorded ones that verify, write the rest in worker processes.
        progress = _Progress(len(chunks), log)
        records = _verified_records(out, len(chunks), dtype, progress, warn)
        if records:
            log(f"resuming: {len(records)} of {len(chunks)} shards already done and verified")
        tasks = [
            {
                "index": i,
                "out": str(out),
                "pieces": chunks[i],
                "files": {p.file: files[p.file] for p in chunks[i]},
                "tokenizer": tok_spec,
                "dtype": dtype.str,
                **options,
            }
            for i in range(len(chunks))
            if i not in records
        ]

        def finished(record: dict) -> None:
            write_json(progress_dir / f"shard-{record['index']:05d}.json", record)
            records[record["index"]] = record
            progress.add(record)

        try:
            _run_tasks(tasks, workers, finished)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"interrupted with {len(records)} of {len(chunks)} shards done; run the same "
                "command again to resume"
            ) from None

        # --- totals, warnings, and the manifest (last).
        splits, stats = _totals([records[i] for i in range(len(chunks))])
        _check_splits(splits, stats, len(files), text_field, val_fraction)
        # Warnings only for a dataset that is about to be complete (an error says it all).
        _warn_stats(stats, text_field, invalid_utf8, warn)
        content = hashlib.sha256(tok.identity.encode())
        for split in SPLITS:
            for e in splits[split]["shards"]:
                content.update(f"{split}:{e['bin_sha256']}:{e['idx_sha256']}".encode())
        elapsed = time.perf_counter() - t_start
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": out.resolve().name,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tokenizer": _tokenizer_entry(tok, train_tokenizer, tokenizer_train_mb),
            "dtype": dtype.name,
            **options,
            "inputs": {
                "files": [{"name": f.name, "format": f.format, "bytes": f.size} for f in files],
                "empty_files": empty,
                "bytes": sum(f.size for f in files),
            },
            "stats": stats.to_dict(),
            "splits": splits,
            "content_sha256": content.hexdigest(),
            "plan_sha256": plan_sha,
            "seconds": round(elapsed, 3),
        }
        write_json(out / MANIFEST, manifest)
        shutil.rmtree(progress_dir, ignore_errors=True)
    tr = splits["train"]
    log(
        f"prepared {out}: {tr['tokens']:,} train tokens in {tr['documents']:,} documents + "
        f"{splits['val']['tokens']:,} val tokens, {len(tr['shards'])} shards, "
        f"{tok.kind} vocab {tok.vocab_size:,}, {tr['text_bytes'] / max(tr['tokens'], 1):.2f} "
        f"bytes/token, {elapsed:.1f} s ({progress.rate():.2f} MB/s of input this run)"
    )
    return manifest


def _check_options(
    val_fraction: float,
    workers: int,
    shard_mb: float,
    text_unit: str,
    invalid_utf8: str,
    train_tokenizer: int,
) -> None:
    if not 0 <= val_fraction < 1:
        raise InputError(f"--val-fraction {val_fraction} must be in [0, 1)")
    if workers < 1:
        raise InputError(f"--workers {workers} must be >= 1")
    if not shard_mb > 0:
        raise InputError(f"--shard-mb {shard_mb} must be > 0")
    if text_unit not in inputs_lib.TEXT_UNITS:
        raise InputError(f"--text-unit {text_unit!r}: expected one of {inputs_lib.TEXT_UNITS}")
    if invalid_utf8 not in inputs_lib.INVALID_UTF8:
        raise InputError(f"--invalid-utf8 {invalid_utf8!r}: expected replace or skip")
    if train_tokenizer and not 300 <= train_tokenizer <= 2**32:
        raise InputError(
            f"--train-tokenizer {train_tokenizer}: a byte-level BPE needs at least 300 ids "
            "(256 bytes, end-of-document, merges)"
        )


def _complete_manifest(out: Path, log: Callable[[str], None]) -> dict:
    """The manifest of a dataset already prepared from the same plan, its shards checked."""
    manifest = json.loads((out / MANIFEST).read_text())
    dtype = np.dtype(manifest["dtype"])
    try:
        for split in SPLITS:
            check_files(out, manifest["splits"][split]["shards"], dtype, checksums=True)
    except ValueError as e:
        raise InputError(f"{e} (pass --overwrite)") from None
    tokens = manifest["splits"]["train"]["tokens"]
    log(f"{out} is already prepared from these inputs ({tokens:,} train tokens); nothing to do")
    return manifest


def _verified_records(
    out: Path, n: int, dtype: np.dtype, progress: _Progress, warn: Callable[[str], None]
) -> dict[int, dict]:
    """{shard index: record} of the shards an earlier run finished and that still verify; the
    records of the others are removed (those shards are redone)."""
    records: dict[int, dict] = {}
    for i in range(n):
        record_path = out / PROGRESS_DIR / f"shard-{i:05d}.json"
        if record_path.is_file():
            record = json.loads(record_path.read_text())
            problem = _verify_record(out, record, dtype)
            if problem is None:
                records[i] = record
                progress.add(record, resumed=True)
                continue
            warn(f"redoing shard {i}: {problem}")
            record_path.unlink()
    return records


def _check_splits(
    splits: dict, stats: ReadStats, n_files: int, text_field: str, val_fraction: float
) -> None:
    """A dataset without training documents, or without the validation split asked for, is an
    InputError: nothing is presented as complete."""
    if splits["train"]["documents"] == 0:
        raise InputError(
            f"no training documents in {n_files} input file(s) ({stats.empty} empty, "
            f"{stats.malformed} malformed, {stats.missing_field} without {text_field!r}, "
            f"{stats.invalid_utf8} invalid UTF-8); no dataset was written"
        )
    if val_fraction > 0 and splits["val"]["documents"] == 0:
        raise InputError(
            f"no document was held out for validation ({splits['train']['documents']} "
            f"documents, --val-fraction {val_fraction}): use more or smaller documents "
            "(--text-unit paragraph or line) or a larger --val-fraction, with --overwrite"
        )


def _warn_stats(
    stats: ReadStats, text_field: str, invalid_utf8: str, warn: Callable[[str], None]
) -> None:
    """One warning per kind of input the run skipped or repaired, with its first example."""
    for key, text in _STAT_WARNINGS.items():
        if count := getattr(stats, key):
            if key == "invalid_utf8":
                text += " (replaced by U+FFFD)" if invalid_utf8 == "replace" else " (skipped)"
            warn(f"{count:,} {text.format(field=text_field)}; first: {stats.first[key]}")


def _run_tasks(tasks: list[dict], workers: int, finished: Callable[[dict], None]) -> None:
    """Runs prepare_chunk on every task, in this process or in spawned worker processes
    (spawned, not forked: a fork would copy the tokenizers library's thread pool state)."""
    if workers == 1 or len(tasks) <= 1:
        _init_worker(False)
        for task in tasks:
            finished(prepare_chunk(task))
        return
    with concurrent.futures.ProcessPoolExecutor(
        min(workers, len(tasks)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(True,),
    ) as pool:
        futures = [pool.submit(prepare_chunk, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                finished(future.result())
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise


def _totals(records: list[dict]) -> tuple[dict, ReadStats]:
    """Per-split counts and shard entries (in shard order), and the merged read statistics."""
    stats = ReadStats()
    for record in records:
        stats.merge(record["stats"])
    splits = {}
    for split in SPLITS:
        entries = [r["shards"][split] for r in records if r["shards"][split]]
        splits[split] = {
            "tokens": sum(e["tokens"] for e in entries),
            "documents": sum(e["documents"] for e in entries),
            "text_bytes": sum(r["text_bytes"][split] for r in records),
            "shards": entries,
        }
    return splits, stats


def _tokenizer_entry(tok, train_tokenizer: int, train_mb: float) -> dict:
    """The manifest's "tokenizer" object."""
    if train_tokenizer:
        name = f"bpe{tok.vocab_size}"
    else:
        name = "tokenizer.json" if tok.kind == "json" else tok.kind
    entry = {
        "kind": tok.kind,
        "name": name,
        "vocab_size": tok.vocab_size,
        "eod_id": tok.eod_id,
        "eod_token": {"bytes": None, "cl100k_base": EOD_TOKEN}.get(tok.kind)
        or getattr(tok, "eod_token", None),
        "file": "tokenizer.json" if tok.kind == "json" else None,
        "identity": tok.identity,
    }
    if train_tokenizer:
        entry["trained"] = {"vocab_size": train_tokenizer, "train_mb": train_mb}
    return entry


# --- command line ---------------------------------------------------------------------------


if __name__ == "__main__":  # the command line moved: say where, in one line
    sys.exit("the command line of perijax.data.prepare is `perijax prepare` (perijax.cli.prepare)")
