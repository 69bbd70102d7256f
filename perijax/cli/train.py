"""`perijax train`: its arguments (which the launchers also parse, `train_parser`) and its entry
point around `perijax.train.train`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from perijax.cli.common import DEFAULT_CONFIG, fail


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
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
    train.add_argument(
        "--branch-from",
        metavar="RUN[@STEP]",
        help="start a new run (--workdir) from another run's checkpoint at STEP (default: its "
        "latest): parameters, optimizer state and data position, with this launch's config "
        "(e.g. a new schedule tail); a relaunch resumes the branch's own checkpoints; same as "
        "--config.checkpoint.branch_from",
    )
    return train


def train_parser() -> argparse.ArgumentParser:
    """A standalone parser of `train`'s arguments (the launchers check a launched command with
    it); a malformed argument raises argparse.ArgumentError instead of exiting."""
    parser = argparse.ArgumentParser(prog="perijax", exit_on_error=False)
    train = add_parser(parser.add_subparsers(dest="command"))
    train.exit_on_error = False
    return train


def _default_workdir(spec: str) -> str:
    name = Path(spec.partition(":")[0]).stem
    return os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """Entry point of `perijax train`: 2 for bad input, 3 when training diverged, 130 when
    interrupted."""
    from perijax import config as config_lib
    from perijax import storage
    from perijax.config import ConfigError

    if args.restore:
        overrides = [*overrides, ("checkpoint.restore", args.restore)]
    if args.branch_from:
        overrides = [*overrides, ("checkpoint.branch_from", args.branch_from)]
    try:
        cfg = config_lib.load(args.config, overrides)
        workdir = args.workdir or _default_workdir(args.config)
        if storage.as_path(workdir).exists() and not storage.as_path(workdir).is_dir():
            raise ConfigError(f"--workdir {workdir} exists and is not a directory")
        from perijax import distributed

        distributed.initialize(cfg.distributed)  # before anything starts a JAX backend
        from perijax import train as train_lib

        data = train_lib.load_data(cfg)
    except ConfigError as e:
        return fail(str(e))
    import jax

    if jax.process_index() == 0:
        print(f"workdir: {workdir}", flush=True)
    from perijax.checkpoint import CheckpointError
    from perijax.data import DataError
    from perijax.lease import LeaseError

    try:
        train_lib.train(cfg, workdir, data=data, log=lambda s: print(s, flush=True))
    except (ConfigError, CheckpointError, LeaseError) as e:
        return fail(str(e))
    except DataError as e:  # an object gone or truncated mid-run; the checkpoints are intact
        return fail(f"{e} (the run stopped; a relaunch resumes from its last checkpoint)", code=1)
    except train_lib.TrainingDiverged as e:
        return fail(f"training diverged: {e}", code=3)
    except KeyboardInterrupt:
        return fail("interrupted", code=130)
    return 0
