"""Cluster launchers: `perijax launch-slurm` (sbatch scripts and job arrays for GPU clusters) and
`perijax launch-tpu` (Cloud TPU VMs and queued resources through gcloud). docs/launching.md has
the recipes.

Each subcommand stores its entry point as `args.launcher(args, overrides) -> int`, so the
`perijax` command registers and dispatches them with:

    launchers.add_parsers(sub)                                # in cli.build_parser()
    if hasattr(args, "launcher"): return args.launcher(args, overrides)   # in cli.main()
"""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers launch-slurm and launch-tpu on the `perijax` command's subparsers."""
    from perijax.launchers import slurm, tpu

    slurm.add_parser(sub)
    tpu.add_parser(sub)
