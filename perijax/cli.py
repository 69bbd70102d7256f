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
import os
import sys
import time
from pathlib import Path

from perijax import __version__

DEFAULT_CONFIG = "configs/tiny.py"


def _fail(message: str, code: int = 2) -> int:
    print(f"perijax: error: {message}", file=sys.stderr)
    return code


def _split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Separates `--config.a.b=v` / `--config.a.b v` overrides from the other arguments
    (everything after a bare `--` is left alone, for launch-local)."""
    rest, overrides = [], []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg.startswith("--config."):
            key, sep, value = arg[len("--config.") :].partition("=")
            if not sep:
                if i + 1 >= len(argv):
                    raise ValueError(f"--config.{key} needs a value: --config.{key}=VALUE")
                value, i = argv[i + 1], i + 1
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return rest, overrides


def _build_config(spec: str, overrides: list[tuple[str, str]]):
    from perijax import config as config_lib

    cd = config_lib.load_config_file(spec)
    for key, value in overrides:
        config_lib.apply_override(cd, key, value)
    return config_lib.resolve(cd)


def _default_workdir(spec: str) -> str:
    name = Path(spec.partition(":")[0]).stem
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def cmd_train(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    from perijax import storage
    from perijax.config import ConfigError

    if args.restore:
        overrides = [*overrides, ("checkpoint.restore", args.restore)]
    try:
        cfg = _build_config(args.config, overrides)
        workdir = args.workdir or _default_workdir(args.config)
        if storage.as_path(workdir).exists() and not storage.as_path(workdir).is_dir():
            raise ConfigError(f"--workdir {workdir} exists and is not a directory")
        from perijax import distributed

        distributed.initialize(cfg.distributed)  # before anything starts a JAX backend
        from perijax import train as train_lib

        data = train_lib.load_data(cfg)
    except ConfigError as e:
        return _fail(str(e))
    import jax

    if jax.process_index() == 0:
        print(f"workdir: {workdir}", flush=True)
    from perijax.checkpoint import CheckpointError

    try:
        train_lib.train(cfg, workdir, data=data, log=lambda s: print(s, flush=True))
    except (ConfigError, CheckpointError) as e:
        return _fail(str(e))
    except train_lib.TrainingDiverged as e:
        return _fail(f"training diverged: {e}", code=3)
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from perijax import bench, evaluate, generate, hf, launch, launchers, plan, report, sweep

    parser = argparse.ArgumentParser(
        prog="perijax",
        description="Pretrain decoder-only LMs with the LayerNorm placement as a setting. "
        "Any config key can be overridden with --config.SECTION.KEY=VALUE.",
    )
    parser.add_argument("--version", action="version", version=f"perijax {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a model",
        description="Train a model. Any config key can be overridden with "
        "--config.SECTION.KEY=VALUE (e.g. --config.model.ln_placement=peri).",
    )
    train.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        metavar="FILE[:ARG]",
        help=f"config file and optional argument (default: {DEFAULT_CONFIG})",
    )
    train.add_argument(
        "--workdir",
        help="output directory (default: runs/<config>-<time>); a workdir with checkpoints "
        "resumes from its latest one",
    )
    train.add_argument(
        "--restore",
        metavar="PATH",
        help="start from this checkpoint (a checkpoints/<step> folder, or a workdir for its "
        "latest), even if the workdir has its own; same as --config.checkpoint.restore",
    )
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
        rest, overrides = _split_overrides(argv)
    except ValueError as e:
        return _fail(str(e))
    parser = build_parser()
    args = parser.parse_args(rest or ["train"])
    if args.command is None:
        parser.print_help()
        return 2
    if overrides and args.command == "launch-local":
        return _fail("put --config.* overrides after `--`, on the launched command")
    if overrides and args.command in ("eval", "generate", "export"):
        key = overrides[0][0]
        return _fail(f"perijax {args.command} takes no --config.{key}: it uses the checkpoint's")
    if hasattr(args, "launcher"):  # launch-slurm, launch-tpu (perijax/launchers)
        return args.launcher(args, overrides)
    if args.command == "train":
        return cmd_train(args, overrides)
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
    return _fail(f"unknown command {args.command!r}")


if __name__ == "__main__":
    sys.exit(main())
