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

Each subcommand is a module of this package, or of perijax.experiments (sweep, report) and
perijax.launchers (launch-local, launch-slurm, launch-tpu), with `add_parser(sub)` and `run`.
Errors in the user's input print one line to stderr and exit with status 2, before anything is
computed or written.
"""

from __future__ import annotations

import argparse
import sys

from perijax import __version__
from perijax.cli.common import DEFAULT_CONFIG, fail, split_overrides

__all__ = ["DEFAULT_CONFIG", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The `perijax` parser; each subcommand's parser carries its entry point as `args.run(args,
    overrides) -> int` (`args.launcher` for launch-slurm and launch-tpu)."""
    from perijax import launchers
    from perijax.cli import bench, generate, hf, plan, prepare, train
    from perijax.cli import eval as eval_cli
    from perijax.experiments import report, sweep
    from perijax.launchers import local

    parser = argparse.ArgumentParser(
        prog="perijax",
        description="Pretrain decoder-only LMs with the LayerNorm placement as a setting. "
        "Any config key can be overridden with --config.SECTION.KEY=VALUE.",
    )
    parser.add_argument("--version", action="version", version=f"perijax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    adders = [train.add_parser, plan.add_parser, bench.add_parser, local.add_parser]
    adders += [launchers.add_parsers, sweep.add_parser, report.add_parser, generate.add_parser]
    adders += [eval_cli.add_parser, hf.add_parsers, prepare.add_parser]
    for add in adders:  # in the order of `perijax --help`
        add(sub)
    runs = {
        "train": train.run,
        "plan": plan.run,
        "bench": bench.run,
        "sweep": sweep.run,
        "report": report.run,
        "import": hf.run_import,
        "launch-local": lambda args, _: local.run(args),
        "generate": lambda args, _: generate.run(args),
        "eval": lambda args, _: eval_cli.run(args),
        "export": lambda args, _: hf.run_export(args),
        "prepare": lambda args, _: prepare.run(args),
    }
    for name, run in runs.items():
        sub.choices[name].set_defaults(run=run)
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
    return args.run(args, overrides)
