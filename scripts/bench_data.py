"""Data pipeline benchmark: `perijax prepare` throughput (MB/s of input text) per tokenizer and
worker count, and loader throughput (tokens/s) at the configs/small.py shape.

    python scripts/bench_data.py [--mb 10] [--workers 1 2] [--trainer-tokens-per-s 1500]
    python scripts/bench_data.py --gcs     # only: local shards vs the same read from a GCS
                                           # emulator, in place and copied (the test extra)

The corpus is the embedded stdlib corpus (corpus.stdlib_files, ~10 MB of real Python source),
written once as JSON Lines, so the numbers are reproducible on any machine with no download.
Prints one markdown table per part (docs/data.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from perijax.data import open_datasets, stdlib_files
from perijax.data.prepare import prepare


def write_corpus(folder: Path, limit_mb: float, repeat: int) -> tuple[Path, float]:
    """The stdlib files (sorted, at most `limit_mb`), `repeat` times, as one JSON Lines file;
    returns its path and MB. Repeating makes a run long enough to show worker scaling."""
    root, files = stdlib_files()
    path = folder / "stdlib.jsonl"
    with open(path, "w") as f:
        for _ in range(repeat):
            total = 0
            for rel, size in files:
                if total + size > limit_mb * 1e6:
                    break
                text = (root / rel).read_bytes().decode("utf-8", errors="replace")
                f.write(json.dumps({"text": text, "path": rel}) + "\n")
                total += size
    return path, path.stat().st_size / 1e6


def bench_prepare(corpus: Path, work: Path, workers: list[int]) -> dict[str, Path]:
    print("| tokenizer | workers | MB | seconds | MB/s | tokens | bytes/token |")
    print("|---|---|---|---|---|---|---|")
    trained = re.compile(r"^trained .* in ([\d.]+) s$")
    kinds = {
        "bytes": {"tokenizer": "bytes"},
        "cl100k_base": {"tokenizer": "cl100k_base"},
        "bpe8192 (trained)": {"train_tokenizer": 8192, "tokenizer_train_mb": 10.0},
    }
    made = {}
    for label, kwargs in kinds.items():
        for n in workers:
            out = work / f"{label.split()[0]}-w{n}"
            shutil.rmtree(out, ignore_errors=True)
            logs: list[str] = []
            t0 = time.perf_counter()
            manifest = prepare(
                [str(corpus)],
                out,
                shard_mb=1.0,  # ~10 shards, so that every worker count has work to share
                val_fraction=0.01,
                workers=n,
                log=logs.append,
                warn=lambda s: None,
                **kwargs,
            )
            seconds = time.perf_counter() - t0
            training = [float(m.group(1)) for line in logs if (m := trained.match(line))]
            note = f" (incl. {training[0]:.1f} s training)" if training else ""
            mb = manifest["inputs"]["bytes"] / 1e6
            train = manifest["splits"]["train"]
            tokens = train["tokens"] + manifest["splits"]["val"]["tokens"]
            print(
                f"| {label} | {n} | {mb:.1f} | {seconds:.1f}{note} | {mb / seconds:.2f} | "
                f"{tokens:,} | {train['text_bytes'] / train['tokens']:.2f} |",
                flush=True,
            )
            made[label.split()[0]] = out
    return made


def bench_loader(made: dict[str, Path], batches: int, trainer_rate: float) -> None:
    print()
    print(f"| loader (seq_len 256, global batch 32, {os.cpu_count()} CPUs) | tokens/s | "
          f"x trainer ({trainer_rate:,.0f} tokens/s) |")  # fmt: skip
    print("|---|---|---|")
    bpe = made["bpe8192"]
    cases = {
        "bpe8192, 2 threads": (str(bpe), {}),
        "bpe8192, 2 threads, segment ids": (str(bpe), {"with_segment_ids": True}),
        "bpe8192, 0 threads (inline)": (str(bpe), {"num_threads": 0, "prefetch": 0}),
        "mixture bpe8192=0.7 + itself copy=0.3": (None, {}),
    }
    copy = bpe.parent / "bpe8192-copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(bpe, copy)
    for label, (path, kwargs) in cases.items():
        path = path or f"{bpe}=0.7,{copy}=0.3"
        ds = open_datasets("prepared", path=path, vocab_size=8192, log=lambda s: None)
        it = ds.train_iterator(seq_len=256, global_batch_size=32, seed=0, **kwargs)
        next(it)  # start-up (threads, first maps) is not throughput
        t0 = time.perf_counter()
        for _ in range(batches):
            next(it)
        rate = batches * 32 * 256 / (time.perf_counter() - t0)
        print(f"| {label} | {rate:,.0f} | {rate / trainer_rate:,.0f}x |", flush=True)


def bench_remote(corpus: Path, work: Path, batches: int, latency_ms: float) -> None:
    """Loader tokens/s over a bytes-tokenized dataset: local shards, and the same uploaded to a
    GCS emulator on this machine, read in place (per thread count) and copied to the cache.
    `latency_ms` adds that wait to every object read (the emulator answers in well under a
    millisecond; a real bucket's first byte takes tens of milliseconds)."""
    import asyncio
    import gc
    import sys

    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")  # as the emulator needs
    import gcsfs

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import gcs_emulator
    from etils import epath

    from perijax.data import remote

    folder = work / "bytes-gcs"
    shutil.rmtree(folder, ignore_errors=True)
    prepare([str(corpus)], folder, tokenizer="bytes", shard_mb=8.0, val_fraction=0.01,
            log=lambda s: None, warn=lambda s: None)  # fmt: skip
    size = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
    shutil.rmtree(work / "gcs", ignore_errors=True)
    (work / "gcs").mkdir()
    if latency_ms:
        real = gcsfs.GCSFileSystem._cat_file

        async def slow(self, *args, **kwargs):
            await asyncio.sleep(latency_ms / 1e3)
            return await real(self, *args, **kwargs)

        gcsfs.GCSFileSystem._cat_file = slow
    with gcs_emulator.running(work / "gcs", "bench"):
        url = "gs://bench/bytes"
        t0 = time.perf_counter()
        for f in folder.iterdir():
            (epath.Path(url) / f.name).write_bytes(f.read_bytes())
        upload = time.perf_counter() - t0
        print(f"\ndataset: {size:.0f} MB of uint16 shards; uploaded to the emulator in "
              f"{upload:.1f} s ({size / upload:.0f} MB/s)\n")  # fmt: skip
        print(f"added latency per request: {latency_ms:g} ms\n")
        print(f"| data (global batch 32, {os.cpu_count()} CPUs) | seq_len | threads | "
              "tokens/s | requests per batch | open (s) |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        cache = work / "gcs-cache"
        cases = [
            ("local shards", str(folder), 2, {}),
            ("gs://, in place", url, 2, {}),
            ("gs://, in place", url, 8, {}),
            ("gs://, in place", url, 16, {}),
            ("gs://, in place, segment ids", url, 8, {"with_segment_ids": True}),
            ("gs://, copied to the cache (data.remote=copy)", url, 2, {}),
        ]
        for seq_len in (256, 2048):
            for label, path, threads, kwargs in cases:
                shutil.rmtree(cache, ignore_errors=True)
                t0 = time.perf_counter()
                ds = open_datasets(
                    "prepared", path=path, vocab_size=257, cache_dir=str(cache),
                    remote="copy" if "copied" in label else "stream", log=lambda s: None,
                )  # fmt: skip
                opened = time.perf_counter() - t0
                it = ds.train_iterator(seq_len=seq_len, global_batch_size=32, seed=0,
                                       num_threads=threads, prefetch=16, **kwargs)  # fmt: skip
                next(it)  # start-up (threads, first requests) is not throughput
                remote.READS.reset()
                t0 = time.perf_counter()
                for _ in range(batches):
                    next(it)
                rate = batches * 32 * seq_len / (time.perf_counter() - t0)
                per_batch = remote.READS.requests / batches
                print(f"| {label} | {seq_len} | {threads} | {rate:,.0f} | {per_batch:.1f} | "
                      f"{opened:.1f} |", flush=True)  # fmt: skip
                del it, ds
                gc.collect()
                time.sleep(1)  # the last iterator's read-ahead stops before the next case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=100.0, help="corpus size cap (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="copies of the corpus (default 3)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, os.cpu_count() or 1])
    parser.add_argument("--batches", type=int, default=500, help="loader batches to time")
    parser.add_argument(
        "--trainer-tokens-per-s",
        type=float,
        default=1500.0,
        help="what the trainer consumes (configs/small.py on 2 CPU cores: ~1.5k)",
    )
    parser.add_argument("--work-dir", help="where datasets go (default: a temp folder)")
    parser.add_argument("--gcs", action="store_true", help="only the object-storage loader part")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="--gcs: added per request")
    args = parser.parse_args()
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="perijax-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus, mb = write_corpus(work, args.mb, args.repeat)
    print(f"corpus: {corpus} ({mb:.1f} MB of JSON Lines from the stdlib)\n")
    if args.gcs:
        bench_remote(corpus, work, args.batches, args.latency_ms)
    else:
        made = bench_prepare(corpus, work, args.workers)
        bench_loader(made, args.batches, args.trainer_tokens_per_s)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
