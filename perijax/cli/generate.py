"""`perijax generate`: the command line of `perijax.generate` (docs/eval_export.md).

    perijax generate runs/tiny/checkpoints/500 --prompt "def main(" --max-new-tokens 64

The options are checked before the checkpoint is loaded; bad input is one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from perijax.generate import generate


def add_parser(sub) -> None:
    p = sub.add_parser(
        "generate",
        help="sample text from a checkpoint",
        description="Sample continuations from a checkpoint with a KV cache (docs/eval_export.md).",
    )
    p.add_argument("checkpoint", help="a checkpoints/<step> folder, or a workdir (its latest)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    src.add_argument("--prompt-file", help="a file of prompts, one per line ('-': stdin)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0: off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--tokenizer",
        help="tokenizer.json to use instead of the run's (needed for synthetic-data runs)",
    )
    p.add_argument(
        "--ids", action="store_true", help="prompts are space-separated token ids; print ids"
    )
    p.add_argument(
        "--no-stop", action="store_true", help="do not stop at the end-of-document token"
    )


def _read_prompts(args) -> list[str]:
    if args.prompt:
        return list(args.prompt)
    if args.prompt_file:
        text = sys.stdin.read() if args.prompt_file == "-" else Path(args.prompt_file).read_text()
        return [line for line in text.splitlines() if line.strip()]
    return ["\n"]


def run(args: argparse.Namespace) -> int:
    from perijax.checkpoint import CheckpointError
    from perijax.cli.common import fail
    from perijax.config import ConfigError
    from perijax.data.tokenizer import load_tokenizer
    from perijax.trained import load_model, run_tokenizer

    if args.max_new_tokens < 1:
        return fail(f"--max-new-tokens {args.max_new_tokens} must be >= 1")
    if args.temperature < 0 or args.top_k < 0 or not 0.0 < args.top_p <= 1.0:
        return fail("need --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if args.prompt_file and args.prompt_file != "-" and not Path(args.prompt_file).is_file():
        return fail(f"--prompt-file {args.prompt_file}: no such file")
    try:
        prompts = _read_prompts(args)
        loaded = load_model(args.checkpoint)
        tokenizer = None
        if not args.ids:
            tokenizer = (
                load_tokenizer(args.tokenizer) if args.tokenizer else run_tokenizer(loaded.cfg)
            )
            if tokenizer is None:
                raise ConfigError(
                    "this run has no tokenizer (synthetic data): pass --ids with token ids, "
                    "or --tokenizer FILE"
                )
        if args.ids:
            ids = [[int(t) for t in p.split()] for p in prompts]
        else:
            ids = [tokenizer.encode(p).tolist() for p in prompts]
        stop = () if args.no_stop or tokenizer is None else (tokenizer.eod_id,)
        t0 = time.perf_counter()
        outputs = generate(
            loaded.model,
            ids,
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop_tokens=stop,
        )
    except (ConfigError, CheckpointError, ValueError) as e:
        return fail(str(e).splitlines()[0])
    elapsed = time.perf_counter() - t0
    for prompt, out in zip(prompts, outputs, strict=True):
        if args.ids:
            print(" ".join(map(str, out)))
        else:
            print(prompt + tokenizer.decode([t for t in out if t not in stop]))
            print("-" * 40)
    n = sum(len(o) for o in outputs)
    print(
        f"generated {n} tokens for {len(outputs)} prompt(s) in {elapsed:.1f}s "
        f"(step {loaded.step} of {loaded.path})",
        file=sys.stderr,
    )
    return 0
