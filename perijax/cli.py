"""The `perijax` command. Subcommands are thin: they parse arguments, resolve the config and call
the library.

    perijax train [--config FILE[:ARG]] [--workdir DIR] [--config.SECTION.KEY=VALUE ...]
    perijax plan  [--config FILE[:ARG]] --devices N --accelerator NAME [--config.X=V ...]
    perijax bench [--config FILE[:ARG]] [--placements all] [--json OUT]  (docs/performance.md)
    perijax launch-local -n N [--devices-per-process D] -- train ...
    perijax prepare INPUTS... --out DIR --tokenizer cl100k_base   (docs/data.md)
    perijax launch-slurm / launch-tpu ... --dry-run                (docs/launching.md)
    perijax sweep --sweep configs/sweeps/x.py / perijax report DIR  (docs/experiments.md)
    perijax generate CHECKPOINT --prompt TEXT                       (docs/eval_export.md)
    perijax eval CHECKPOINT [--tasks ...]                           (docs/eval_export.md)
    perijax export CHECKPOINT --out DIR / perijax import HF_DIR --out WORKDIR

Errors in the user's input print one line to stderr and exit with status 2, before anything is
computed or written.
"""

from __future__ import annotations

import argparse
import sys

from perijax import __version__
from perijax.commandline import DEFAULT_CONFIG, add_train_parser, fail, run_train, split_overrides

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from perijax import bench, evaluate, generate, hf, launch, launchers, plan, report, sweep

    parser = argparse.ArgumentParser(
        prog="perijax",
        description="Pretrain decoder-only LMs with the LayerNorm placement as a setting. "
        "Any config key can be overridden with --config.SECTION.KEY=VALUE.",
    )
    parser.add_argument("--version", action="version", version=f"perijax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_train_parser(sub)
    plan.add_parser(sub)
    bench.add_parser(sub)
    launch.add_parser(sub)
    launchers.add_parsers(sub)
    sweep.add_parser(sub)
    report.add_parser(sub)
    generate.add_parser(sub)
    evaluate.add_parser(sub)
    hf.add_parsers(sub)
    from perijax.data import prepare

    prepare.add_prepare_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if argv is None:  # the real command line (not a library call)
        argv = sys.argv[1:]
        from perijax.tuning import tune_host

        tune_host()  # before any thread allocates (perijax/tuning/cpu_malloc.py)
        if argv[:1] in ([], ["train"]):
            from perijax.signals import install_signal_thread

            install_signal_thread()  # before JAX starts any thread (perijax/signals.py)
    try:
        rest, overrides = split_overrides(argv)
    except ValueError as e:
        return fail(str(e))
    parser = build_parser()
    args = parser.parse_args(rest or ["train"])
    if args.command is None:
        parser.print_help()
        return 2
    if overrides and args.command == "launch-local":
        return fail("put --config.* overrides after `--`, on the launched command")
    if overrides and args.command in ("eval", "generate", "export"):
        key = overrides[0][0]
        return fail(f"perijax {args.command} takes no --config.{key}: it uses the checkpoint's")
    if hasattr(args, "launcher"):  # launch-slurm, launch-tpu (perijax/launchers)
        return args.launcher(args, overrides)
    if args.command == "train":
        return run_train(args, overrides)
    if args.command == "sweep":
        from perijax import sweep

        return sweep.run(args, overrides)
    if args.command == "report":
        from perijax import report

        return report.run(args, overrides)
    if args.command == "plan":
        from perijax import plan

        return plan.run(args, overrides)
    if args.command == "launch-local":
        from perijax import launch

        return launch.run(args)
    if args.command == "bench":
        from perijax import bench

        return bench.run(args, overrides)
    if args.command == "export":
        from perijax import hf

        return hf.run_export(args)
    if args.command == "import":
        from perijax import hf

        return hf.run_import(args, overrides)
    if args.command == "eval":
        from perijax import evaluate

        return evaluate.run(args)
    if args.command == "generate":
        from perijax import generate

        return generate.run(args)
    if args.command == "prepare":
        from perijax.data import prepare

        return prepare.run_prepare(args)
    return fail(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
