"""`perijax prepare`: the command line of `perijax.data.prepare` (docs/data.md).

    perijax prepare INPUT [INPUT ...] --out DIR [--tokenizer cl100k_base|bytes|tokenizer.json
        | --train-tokenizer VOCAB_SIZE] [--workers N] [--val-fraction F] ...

Bad input prints one line, ``perijax: error: ...``, and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

from perijax.cli.common import fail
from perijax.data import inputs as inputs_lib
from perijax.data.prepare import (
    DEFAULT_SHARD_MB,
    DEFAULT_TOKENIZER_TRAIN_MB,
    DEFAULT_VAL_FRACTION,
    prepare,
)
from perijax.data.tokenizer import BUILTIN


def add_parser(subparsers) -> None:
    """Registers `prepare` and its flags on an argparse subparsers object."""
    p = subparsers.add_parser(
        "prepare",
        help="tokenize text / JSON Lines / Parquet into token shards",
        description=(
            "Tokenize plain text, JSON Lines or Parquet (files, folders or globs) into token "
            "shards with a manifest (docs/data.md). Rerun the same command to resume."
        ),
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or quoted globs")
    p.add_argument("--out", "-o", required=True, metavar="DIR", help="dataset folder to write")
    p.add_argument(
        "--tokenizer",
        metavar="NAME_OR_PATH",
        help=f"{' | '.join(BUILTIN)} | a tokenizer.json (or its folder); default cl100k_base",
    )
    p.add_argument(
        "--train-tokenizer",
        type=int,
        default=0,
        metavar="VOCAB_SIZE",
        help="train a byte-level BPE of this many ids on the training split instead",
    )
    p.add_argument(
        "--tokenizer-train-mb",
        type=float,
        default=DEFAULT_TOKENIZER_TRAIN_MB,
        metavar="MB",
        help=f"text to train the BPE on (default {DEFAULT_TOKENIZER_TRAIN_MB:g})",
    )
    p.add_argument("--eod-token", metavar="TOKEN", help="end-of-document token of a tokenizer.json")
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "text", "jsonl", "parquet"),
        help="auto (default): by file name; otherwise read every input as this format",
    )
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help="JSON Lines key / Parquet column holding the text (default text)",
    )
    p.add_argument(
        "--text-unit",
        default="file",
        choices=inputs_lib.TEXT_UNITS,
        help="one document per text file (default), per blank-line paragraph, or per line",
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        default=DEFAULT_VAL_FRACTION,
        help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})",
    )
    p.add_argument(
        "--invalid-utf8",
        default="replace",
        choices=inputs_lib.INVALID_UTF8,
        help="documents with non-UTF-8 bytes: replace the bytes with U+FFFD, or skip them",
    )
    p.add_argument(
        "--shard-mb",
        type=float,
        metavar="MB",
        default=DEFAULT_SHARD_MB,
        help=f"input MB per shard (default {DEFAULT_SHARD_MB:g}); one shard is one work unit",
    )
    p.add_argument(
        "--workers",
        type=int,
        metavar="N",
        default=os.cpu_count() or 1,
        help="tokenizer processes (default: all cores)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in DIR")
    p.set_defaults(command="prepare")


def run(args: argparse.Namespace) -> int:
    """Runs `perijax prepare`; returns the exit status (2 for bad input, 130 if interrupted)."""
    if args.tokenizer and args.train_tokenizer:
        return fail("use --tokenizer or --train-tokenizer, not both")
    try:
        prepare(
            args.inputs,
            args.out,
            tokenizer=args.tokenizer or "cl100k_base",
            train_tokenizer=args.train_tokenizer,
            tokenizer_train_mb=args.tokenizer_train_mb,
            eod_token=args.eod_token,
            fmt=args.format,
            text_field=args.text_field,
            text_unit=args.text_unit,
            val_fraction=args.val_fraction,
            invalid_utf8=args.invalid_utf8,
            shard_mb=args.shard_mb,
            workers=args.workers,
            overwrite=args.overwrite,
            log=lambda s: print(s, flush=True),
        )
    except ValueError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return fail(str(e) or "interrupted", code=130)
    except OSError as e:  # disk full, permissions: still one line
        return fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="perijax")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(["prepare", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
