"""`perijax launch-tpu`: Cloud TPU VMs and queued resources through gcloud, and the same
`perijax train` command on every worker.

    perijax launch-tpu create  peri-v5e --zone us-west4-a --project my-proj \\
        --accelerator-type v5litepod-16 --spot
    perijax launch-tpu install peri-v5e --zone us-west4-a --project my-proj
    perijax launch-tpu run     peri-v5e --zone us-west4-a --project my-proj \\
        --accelerator-type v5litepod-16 --restart-on-preemption -- \\
        train --config configs/paper.py:size=400m --workdir /mnt/shared/runs/peri-400m \\
        --config.mesh.data=1 --config.mesh.fsdp=16
    perijax launch-tpu logs|stop|delete|list ...

`run` ssh-es into all workers (`--worker=all`) and starts the command there; each worker keeps
its output in ~/perijax-logs/RUN.log (and a local copy per worker with the foreground run),
`stop` sends SIGTERM everywhere (the trainer saves a checkpoint and exits 0), and
`--restart-on-preemption` recreates a preempted TPU, reinstalls and reruns; the run resumes from
the workdir's latest checkpoint. Multislice (`--num-slices K`) uses a queued resource of K slices
and `mesh.dcn_data` = K. Every subcommand takes --dry-run and prints the exact commands.

Also runnable as `python -m perijax.launchers.tpu ...`. The gcloud steps and the scripts each
action runs are perijax.launchers.tpu_steps; this module is the command line: the arguments of
each action, their checks, and the plan of steps each action runs.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence

from perijax.launchers import common
from perijax.launchers.common import LaunchError, Step, command, note
from perijax.launchers.tpu_steps import (
    DEFAULT_SETUP,
    STOP_SCRIPT,
    Target,
    check_run,
    create_steps,
    default_source,
    delete_steps,
    install_steps,
    list_steps,
    logs_script,
    run_steps_for,
    run_with_restarts,
    tpu_type,
)


def _execute(argv: Sequence[str]) -> int:
    return subprocess.run(list(argv)).returncode


def _query(argv: Sequence[str]) -> str | None:
    proc = subprocess.run(list(argv), capture_output=True, text=True)
    return (proc.stdout.strip() or None) if proc.returncode == 0 else None


def _common_args(p: argparse.ArgumentParser, *, name: bool = True) -> None:
    if name:
        p.add_argument("name", help="TPU VM or queued-resource name")
    p.add_argument(
        "--zone",
        default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"),
        help="e.g. us-west4-a (default: $CLOUDSDK_COMPUTE_ZONE)",
    )
    p.add_argument(
        "--project",
        default=os.environ.get("CLOUDSDK_CORE_PROJECT"),
        help="Google Cloud project (default: $CLOUDSDK_CORE_PROJECT)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands; run none")


def _slices_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-slices", type=int, default=1, help="multislice: slices (default: 1)")
    p.add_argument("--queued", action="store_true", help="a queued resource, not a plain TPU VM")


def _create_args(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--accelerator-type",
        required=required,
        metavar="TYPE",
        help="v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N",
    )
    p.add_argument("--runtime-version", help="TPU software version (default: per generation)")
    p.add_argument("--spot", action="store_true", help="Spot capacity (cheaper, preemptible)")


def _install_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--source",
        default=default_source(),
        help="source tree to copy to the workers (default: this checkout)",
    )
    p.add_argument("--python", default="python3.11", help="Python on the workers (>= 3.11)")


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("create", help="create a TPU VM or queued resource")
    _common_args(c)
    _slices_args(c)
    _create_args(c, required=True)
    ls = sub.add_parser("list", help="list TPU VMs and queued resources")
    _common_args(ls, name=False)
    d = sub.add_parser("delete", help="delete a TPU VM or queued resource")
    _common_args(d)
    _slices_args(d)
    i = sub.add_parser("install", help="copy this source tree to every worker and pip-install it")
    _common_args(i)
    _slices_args(i)
    _install_args(i)
    r = sub.add_parser("run", help="run a train command on every worker")
    _common_args(r)
    _slices_args(r)
    common.add_preflight_argument(r)
    _create_args(r, required=False)  # checked after _reparse_run: it may follow NAME
    _install_args(r)
    r.add_argument(
        "--detach", action="store_true", help="start the run and return; follow it with `logs`"
    )
    r.add_argument(
        "--restart-on-preemption",
        action="store_true",
        help="recreate a preempted TPU, reinstall and resume (foreground runs)",
    )
    r.add_argument("--max-restarts", type=int, default=10)
    r.add_argument("--log-dir", help="local per-worker logs (default: tpu-logs/NAME/RUN)")
    r.add_argument("--run-name", help="names the worker-side log (default: the workdir's name)")
    r.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run on each worker first (default: cd to the installed "
        "source and activate its virtualenv)",
    )
    r.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--perijax", default="perijax", metavar="COMMAND")
    r.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- train ...")
    r.set_defaults(run_parser=r)
    s = sub.add_parser("stop", help="SIGTERM the run on every worker (it checkpoints and exits)")
    _common_args(s)
    _slices_args(s)
    lg = sub.add_parser("logs", help="fetch every worker's log into a local directory")
    _common_args(lg)
    _slices_args(lg)
    lg.add_argument("--run-name", help="which run's log (default: the latest)")
    lg.add_argument("--out", default=None, help="local directory (default: tpu-logs/NAME/fetched)")
    return p


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "launch-tpu",
        help="create Cloud TPUs and run a train command on every worker (gcloud)",
        description=__doc__.split("\n\n")[0],
    )
    configure_parser(p)
    p.set_defaults(launcher=run)
    return p


def _target(args: argparse.Namespace) -> Target:
    if not args.zone:
        raise LaunchError("--zone is required (or set CLOUDSDK_COMPUTE_ZONE), e.g. us-west4-a")
    if not args.project:
        raise LaunchError("--project is required (or set CLOUDSDK_CORE_PROJECT)")
    name = getattr(args, "name", "") or ""
    if name and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name):
        raise LaunchError(
            f"TPU name {name!r}: lowercase letters, digits and '-', starting with a letter"
        )
    slices = getattr(args, "num_slices", 1)
    if slices < 1:
        raise LaunchError("--num-slices must be >= 1")
    return Target(name, args.zone, args.project, slices, getattr(args, "queued", False))


def _source(args: argparse.Namespace) -> str:
    if not args.source:
        raise LaunchError("--source is required: this perijax is not a source checkout to copy")
    if not os.path.isfile(os.path.join(args.source, "pyproject.toml")):
        raise LaunchError(f"--source {args.source}: not a perijax source tree (no pyproject.toml)")
    return os.path.abspath(args.source)


def plan(args: argparse.Namespace) -> tuple[list[Step], Step | None, list[Step]]:
    """Validates; returns (steps, the run step if any, the steps that recreate a preempted TPU)."""
    target = _target(args)
    if args.action == "list":
        return list_steps(target.zone, target.project), None, []
    if args.action == "create":
        accel = tpu_type(args.accelerator_type)
        return create_steps(target, accel, runtime=args.runtime_version, spot=args.spot), None, []
    if args.action == "delete":
        return delete_steps(target), None, []
    if args.action == "install":
        return install_steps(target, _source(args), args.python), None, []
    if args.action == "stop":
        return [command(*target.ssh(STOP_SCRIPT))], None, []
    if args.action == "logs":
        out = args.out or os.path.join("tpu-logs", target.name, "fetched")
        script = logs_script(args.run_name)
        if not target.multislice:
            return (
                [command("mkdir", "-p", out), command(*target.ssh(script, output_directory=out))],
                None,
                [],
            )
        steps = []
        for i in range(target.num_slices):  # one directory per slice: worker ids repeat
            slice_out = os.path.join(out, f"slice-{i}")
            ssh = target.ssh(script, output_directory=slice_out)
            ssh[ssh.index("--node=all")] = f"--node={i}"
            steps += [command("mkdir", "-p", slice_out), command(*ssh)]
        return steps, None, []
    # run
    accel = tpu_type(args.accelerator_type)
    train = common.parse_train_command(args.argv)
    check_run(train, target, accel)
    if args.detach and args.restart_on_preemption:
        raise LaunchError("--restart-on-preemption watches a foreground run: drop --detach")
    if args.max_restarts < 0:
        raise LaunchError("--max-restarts must be >= 0")
    prep, ssh = run_steps_for(
        train,
        target,
        perijax=shlex.split(args.perijax),
        setup=tuple(args.setup) or DEFAULT_SETUP,
        env=common.parse_env(args.env),
        detach=args.detach,
        log_dir=args.log_dir,
        run_name=args.run_name,
    )
    recreate: list[Step] = []
    if args.restart_on_preemption:
        recreate = [
            *delete_steps(target),
            *create_steps(target, accel, runtime=args.runtime_version, spot=args.spot),
            *install_steps(target, _source(args), args.python),
        ]
    return prep, ssh, recreate


def _reparse_run(args: argparse.Namespace) -> argparse.Namespace:
    """argparse gives everything after the first positional (NAME) to the REMAINDER argument, so
    options written after NAME (`run my-tpu --zone ... -- train ...`) land there: parse them into
    the namespace too. The train command is what follows `--` (without one there is none)."""
    rest = list(args.argv)
    cut = rest.index("--") if "--" in rest else len(rest)
    left, right = rest[:cut], rest[cut + 1 :]
    if left:
        args = args.run_parser.parse_args([*left, args.name, "--", *right], namespace=args)
        args.argv = right
    if not args.accelerator_type:
        raise LaunchError(
            "run needs --accelerator-type (e.g. v5litepod-16): the mesh is checked "
            "against its chips"
        )
    return args


def run(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    if overrides:
        return common.report(
            LaunchError("put --config.* overrides after `--`, on the train command")
        )
    try:
        if args.action == "run":
            args = _reparse_run(args)
        steps, run_step, recreate = plan(args)
        if not args.dry_run:
            common.require_tool("gcloud", "the Google Cloud CLI runs the TPU commands")
        if args.action == "run":  # last: it compiles
            target = _target(args)
            slices = f"{target.num_slices}x" if target.multislice else ""
            common.preflight(
                common.parse_train_command(args.argv),
                f"{slices}{tpu_type(args.accelerator_type).name}",
                args.preflight,
            )
    except LaunchError as e:
        return common.report(e)
    if args.dry_run:
        common.print_steps([*steps, *([run_step] if run_step else [])])
        if recreate:
            common.print_steps(
                [
                    note(
                        f"if the run fails and the TPU is no longer READY/ACTIVE (preempted), "
                        f"recreate it and resume, up to {args.max_restarts} times:"
                    ),
                    command(*_target(args).describe_state()),
                    *recreate,
                    run_step,
                ]
            )
        return 0
    for step in steps:
        if step.argv and step.argv[0] == "mkdir":  # local directories: no need for a process
            os.makedirs(step.argv[-1], exist_ok=True)
    status = common.run_steps([s for s in steps if not (s.argv and s.argv[0] == "mkdir")])
    if status or run_step is None:
        return status
    if recreate:
        return run_with_restarts(
            run_step,
            _target(args),
            recreate,
            max_restarts=args.max_restarts,
            execute=_execute,
            query=_query,
        )
    return common.run_steps([run_step])


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="perijax launch-tpu"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
