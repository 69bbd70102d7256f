"""`perijax eval`: the command line of `perijax.evaluate` (loss and perplexity of a checkpoint,
or lm-evaluation-harness tasks; docs/eval_export.md).

    perijax eval runs/tiny                                   # every token of the val split
    perijax eval runs/tiny/checkpoints/500 --max-batches 8   # = the trainer's eval at step 500
    perijax eval runs/tiny --tasks hellaswag --limit 200     # lm-eval (perijax.lm_eval_adapter)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from perijax import storage
from perijax.cli.common import fail
from perijax.config import ConfigError
from perijax.evaluate import SPLITS, evaluate_checkpoint, run_tasks


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "eval",
        help="loss/perplexity of a checkpoint, or lm-evaluation-harness tasks",
        description="Loss, perplexity and bits per token of a checkpoint on its run's data "
        "(every token of the split by default), or lm-evaluation-harness tasks with --tasks "
        "(docs/eval_export.md).",
    )
    p.add_argument(
        "checkpoint", metavar="CHECKPOINT", help="a checkpoints/<step> folder or a workdir"
    )
    p.add_argument("--split", default="val", metavar="{val,train}", help="default: val (held out)")
    p.add_argument(
        "--batch-size",
        type=int,
        metavar="N",
        help="sequences per batch (default: the run's micro-batch; with --tasks, 16 requests)",
    )
    p.add_argument(
        "--seq-len", type=int, metavar="N", help="tokens per window (default: the run's seq_len)"
    )
    p.add_argument(
        "--max-batches",
        type=int,
        metavar="N",
        help="only the first N batches, in the trainer's eval order (default: every token)",
    )
    p.add_argument("--data", metavar="PATH", help="a prepared dataset folder instead of the run's")
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    g = p.add_argument_group("lm-evaluation-harness (with --tasks)")
    g.add_argument(
        "--tasks", metavar="T1,T2", help="comma-separated task names, globs or task YAML files"
    )
    g.add_argument("--include-path", metavar="DIR", help="a folder of extra task YAMLs")
    g.add_argument("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt")
    g.add_argument("--limit", type=float, metavar="N", help="examples per task (a fraction if < 1)")
    g.add_argument("--tokenizer", metavar="FILE", help="tokenizer.json instead of the run's")
    g.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        help="context window in tokens (default: the run's seq_len)",
    )
    return p


def _check_args(args: argparse.Namespace) -> None:
    if not storage.as_path(args.checkpoint).exists():
        raise ConfigError(f"checkpoint {args.checkpoint}: no such file or directory")
    if args.tasks:
        loss_only = {"--seq-len": args.seq_len, "--max-batches": args.max_batches}
        loss_only |= {"--data": args.data, "--split": None if args.split == "val" else args.split}
        given = [flag for flag, value in loss_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} has no effect with --tasks")
        if args.limit is not None and args.limit <= 0:
            raise ConfigError(f"--limit {args.limit:g} must be > 0")
    else:
        lm_only = {"--include-path": args.include_path, "--num-fewshot": args.num_fewshot}
        lm_only |= {"--limit": args.limit, "--tokenizer": args.tokenizer}
        lm_only |= {"--max-length": args.max_length}
        given = [flag for flag, value in lm_only.items() if value is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --tasks")
        if args.split not in SPLITS:
            raise ConfigError(
                f"unknown --split {args.split!r}: expected one of {', '.join(SPLITS)}"
            )
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise ConfigError(f"--json {args.json}: its folder does not exist")


def _print_loss(result: dict[str, Any]) -> None:
    print(f"checkpoint  {result['checkpoint']} (step {result['step']})")
    print(
        f"data        {result['data']}, {result['split']} split: {result['tokens']:,} tokens in "
        f"{result['batches']:,} batches of {result['batch_size']} x {result['seq_len']}"
    )
    print(f"loss        {result['loss']:.6f} nats/token")
    print(f"perplexity  {result['perplexity']:.4f}")
    print(f"bits/token  {result['bits_per_token']:.6f}")


def run(args: argparse.Namespace) -> int:
    """Entry point of `perijax eval`: bad input is one line on stderr and exit status 2."""
    import jax

    from perijax.checkpoint import CheckpointError

    try:
        _check_args(args)
        if args.tasks:
            tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
            limit = args.limit
            if limit is not None and limit >= 1:
                limit = int(limit)
            result = run_tasks(
                args.checkpoint,
                tasks,
                include_path=args.include_path,
                num_fewshot=args.num_fewshot,
                limit=limit,
                batch_size=args.batch_size,
                tokenizer=args.tokenizer,
                max_length=args.max_length,
            )
        else:
            result = evaluate_checkpoint(
                args.checkpoint,
                split=args.split,
                batch_size=args.batch_size,
                seq_len=args.seq_len,
                max_batches=args.max_batches,
                data_path=args.data,
                log=lambda s: print(s, file=sys.stderr, flush=True),
            )
    except (ConfigError, CheckpointError, ValueError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        return fail("out of device memory: lower --batch-size (or --seq-len)", code=1)
    if jax.process_index() != 0:
        return 0
    if args.tasks:
        from lm_eval.utils import make_table

        print(make_table(result))
        if result.get("groups"):
            print(make_table(result, "groups"))
    else:
        _print_loss(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
