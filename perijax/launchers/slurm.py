"""`perijax launch-slurm`: one sbatch script for N nodes x G GPUs, and job arrays for sweeps.

    perijax launch-slurm --nodes 4 --gpus-per-node 8 --time 24:00:00 --partition h100 \\
        --dry-run -- train --config configs/paper.py:size=3.2b --workdir /shared/runs/peri-3b \\
        --config.mesh.data=4 --config.mesh.fsdp=8 --config.mesh.dcn_data=4

One task per node: each process drives all of its node's GPUs, so `mesh.dcn_data` = nodes puts
data parallelism on the inter-node network and FSDP/tensor parallelism on NVLink. The batch
script computes the coordinator (the first host of the allocation, a port derived from the job
id), and srun starts `TASK_SCRIPT` on every node, which exports PERIJAX_COORDINATOR_ADDRESS /
PERIJAX_NUM_PROCESSES=$SLURM_NTASKS / PERIJAX_PROCESS_ID=$SLURM_PROCID and execs `perijax train`.
Near the time limit (`--signal`) the trainer gets SIGTERM, saves a checkpoint and exits 0, and
the script requeues itself; a requeued or preempted job resumes from the workdir's checkpoint.
docs/launching.md has the recipes and the reason for every environment variable.

Also runnable as `python -m perijax.launchers.slurm ...`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

from perijax.launchers import common
from perijax.launchers.common import LaunchError

# The per-task part; launch/slurm_task.sh holds the same text for hand-written sbatch scripts
# (a test keeps the two equal). The batch script passes it to `bash -c`, so a job does not depend
# on where the repository is checked out.
TASK_SCRIPT = r"""
# One task of a perijax SLURM job: point jax.distributed at the job's coordinator, then run the
# command given as arguments (perijax train ...). srun starts one copy per node:
#   srun bash launch/slurm_task.sh perijax train --config ... --workdir ...
# The coordinator is the first host of the allocation on a port derived from the job id;
# PERIJAX_COORDINATOR_HOST / PERIJAX_COORDINATOR_PORT override them (the batch script sets the
# host once for all tasks; tests point it at 127.0.0.1).
set -euo pipefail
if [[ -z "${SLURM_NTASKS:-}" || -z "${SLURM_PROCID:-}" ]]; then
  echo "slurm_task: SLURM_NTASKS and SLURM_PROCID are unset: start this with srun" >&2
  exit 2
fi
if [[ $# -eq 0 ]]; then
  echo "slurm_task: no command to run" >&2
  exit 2
fi
host="${PERIJAX_COORDINATOR_HOST:-}"
if [[ -z "$host" ]]; then
  hosts="$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")"
  host="${hosts%%$'\n'*}"
fi
# One port per job id, so two jobs whose first node is the same host do not collide.
port="${PERIJAX_COORDINATOR_PORT:-$((10000 + ${SLURM_JOB_ID:-0} % 20000))}"
export PERIJAX_COORDINATOR_ADDRESS="${host}:${port}"
export PERIJAX_NUM_PROCESSES="$SLURM_NTASKS"
export PERIJAX_PROCESS_ID="$SLURM_PROCID"
exec "$@"
"""[1:]

# XLA flags for H100-class GPUs, each with its reason. Only flags that differ from XLA's defaults
# and that the installed jaxlib accepts (tests/test_launch_slurm.py parses them: an unknown flag
# in XLA_FLAGS aborts the process). Sources: JAX "GPU performance tips"
# (https://docs.jax.dev/en/latest/gpu_performance_tips.html), NVIDIA JAX-Toolbox "GPU
# performance" and MaxText's GPU recipes.
H100_XLA_FLAGS: tuple[tuple[str, str], ...] = (
    (
        "--xla_gpu_enable_latency_hiding_scheduler=true",
        "schedule collectives so they overlap with compute (XLA default: off)",
    ),
    (
        "--xla_gpu_enable_pipelined_all_gather=true",
        "with model.scan_layers, start the next layer's FSDP weight all-gather while the current "
        "layer computes (default: off; reduce-scatter is pipelined by default)",
    ),
    (
        "--xla_gpu_enable_pipelined_all_reduce=true",
        "the same for the data-parallel gradient all-reduce across nodes (default: off)",
    ),
    (
        "--xla_gpu_enable_while_loop_double_buffering=true",
        "unroll the layer scan by two so pipelined collectives have an iteration to hide behind "
        "(default: off)",
    ),
)
# Environment for H100-class GPUs: (name, value, reason). Exported only where the user's
# environment does not already set them.
H100_ENV: tuple[tuple[str, str, str], ...] = (
    (
        "XLA_CLIENT_MEM_FRACTION",
        "0.90",
        "JAX preallocates 75% of each GPU's memory by default; training gets 90%, leaving room "
        "for NCCL and cuDNN buffers outside XLA's pool (the older name "
        "XLA_PYTHON_CLIENT_MEM_FRACTION still works; setting both is an error)",
    ),
    (
        "NCCL_DEBUG",
        "WARN",
        "NCCL writes its warnings and errors to the per-node logs; INFO when debugging a hang or "
        "a slow interconnect",
    ),
)

TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


def time_limit_seconds(text: str) -> int:
    """SLURM --time in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS."""
    m = TIME_RE.match(text)
    if not m:
        raise LaunchError(f"--time {text!r}: expected HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = m.groups()
    fields = [int(x) for x in (a, b, c) if x is not None]
    if days is not None:  # D-HH[:MM[:SS]]
        h, mi, s = (fields + [0, 0])[:3]
        return int(days) * 86400 + h * 3600 + mi * 60 + s
    if len(fields) == 1:
        return fields[0] * 60  # minutes
    if len(fields) == 2:
        return fields[0] * 60 + fields[1]  # MM:SS
    return fields[0] * 3600 + fields[1] * 60 + fields[2]


@dataclasses.dataclass(frozen=True)
class SlurmJob:
    """The resources and settings of one sbatch script (a single run or a job array)."""

    nodes: int
    gpus_per_node: int
    time: str
    log_dir: str
    job_name: str = "perijax"
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    exclusive: bool = True
    signal_lead_s: int = 300  # SIGTERM this long before the time limit, to checkpoint
    setup: tuple[str, ...] = ()  # shell lines run before srun (venv, modules)
    env: tuple[tuple[str, str], ...] = ()
    gpu_settings: bool = True  # H100_XLA_FLAGS and H100_ENV
    port: int | None = None  # coordinator port; default: derived from the job id
    srun_args: tuple[str, ...] = ()  # e.g. --container-image=... (pyxis)
    sbatch_args: tuple[str, ...] = ()  # extra #SBATCH options, e.g. --qos=high
    max_parallel: int | None = None  # job arrays: runs at once


def _sbatch_lines(job: SlurmJob, array_size: int | None) -> list[str]:
    log = job.log_dir.rstrip("/")
    out = "%x-%A_%a.out" if array_size else "%x-%j.out"
    opts = [
        f"--job-name={job.job_name}",
        f"--nodes={job.nodes}",
        "--ntasks-per-node=1",
        f"--gpus-per-node={job.gpus_per_node}",
    ]
    if job.cpus_per_task:
        opts.append(f"--cpus-per-task={job.cpus_per_task}")
    opts.append(f"--time={job.time}")
    if job.partition:
        opts.append(f"--partition={job.partition}")
    if job.account:
        opts.append(f"--account={job.account}")
    if job.exclusive:
        opts.append("--exclusive")
    opts += [
        f"--signal=B:USR1@{job.signal_lead_s}",
        "--requeue",
        "--open-mode=append",
        f"--output={log}/{out}",
    ]
    if array_size:
        limit = f"%{job.max_parallel}" if job.max_parallel else ""
        opts.append(f"--array=0-{array_size - 1}{limit}")
    opts += list(job.sbatch_args)
    return [f"#SBATCH {o}" for o in opts]


def _comment(text: str, indent: str = "") -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(text, 98 - len(indent))]


def _environment(job: SlurmJob) -> list[str]:
    lines: list[str] = []
    if job.setup:
        lines += ["", "# --- software environment (the launcher's --setup)", *job.setup]
    if job.gpu_settings:
        lines += ["", "# --- XLA and NCCL settings for H100-class GPUs (docs/launching.md)"]
        lines.append("xla_flags=(")
        for flag, reason in H100_XLA_FLAGS:
            lines += [*_comment(reason, indent="  "), f"  {flag}"]
        lines += [")", 'export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }${xla_flags[*]}"']
        for name, value, reason in H100_ENV:
            lines += _comment(reason)
            if name == "XLA_CLIENT_MEM_FRACTION":
                lines.append(
                    f'[[ -n "${{XLA_PYTHON_CLIENT_MEM_FRACTION:-}}" ]] || '
                    f'export {name}="${{{name}:-{value}}}"'
                )
            else:
                lines.append(f'export {name}="${{{name}:-{value}}}"')
    if job.env:
        lines += ["", "# --- the launcher's --env"]
        lines += [f"export {k}={shlex.quote(v)}" for k, v in job.env]
    return lines


def _render(job: SlurmJob, runs: Sequence[Sequence[str]], *, array: bool) -> str:
    log = job.log_dir.rstrip("/")
    node_log = f"{log}/%x-%A_%a-node%n.log" if array else f"{log}/%x-%j-node%n.log"
    what = f"{len(runs)} runs as a job array" if array else "one run"
    lines = [
        "#!/bin/bash",
        f"# perijax on SLURM: {what}, {job.nodes} node(s) x {job.gpus_per_node} GPU(s), one task "
        "per node.",
        "# A `perijax launch-slurm` batch script; docs/launching.md explains each part.",
        *_sbatch_lines(job, len(runs) if array else None),
        "set -uo pipefail  # not -e: the tasks' exit status is handled at the end",
        *_environment(job),
        "",
        "# --- jax.distributed: process 0 runs on the first node and coordinates.",
        'if [[ -z "${PERIJAX_COORDINATOR_HOST:-}" ]]; then',
        '  hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"',
        "  PERIJAX_COORDINATOR_HOST=\"${hosts%%$'\\n'*}\"",
        "fi",
        "export PERIJAX_COORDINATOR_HOST",
    ]
    if job.port:
        lines.append(f'export PERIJAX_COORDINATOR_PORT="${{PERIJAX_COORDINATOR_PORT:-{job.port}}}"')
    lines += [
        "IFS= read -r -d '' PERIJAX_TASK <<'PERIJAX_TASK' || true",
        TASK_SCRIPT.rstrip("\n"),
        "PERIJAX_TASK",
        "",
    ]
    if array:
        lines.append('case "${SLURM_ARRAY_TASK_ID:?this script is a job array}" in')
        for i, run in enumerate(runs):
            lines.append(f"  {i}) run=({shlex.join(run)}) ;;")
        lines += [
            '  *) echo "perijax: no run for array index $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;',
            "esac",
        ]
    else:
        lines.append(f"run=({shlex.join(runs[0])})")
    srun = ["srun", "--kill-on-bad-exit=1", "--open-mode=append", f"--output={node_log}"]
    if job.cpus_per_task:  # since SLURM 22.05 srun no longer inherits sbatch's value
        srun.append(f"--cpus-per-task={job.cpus_per_task}")
    srun += list(job.srun_args)
    lines += [
        'echo "perijax: job ${SLURM_JOB_ID:-?} attempt $((${SLURM_RESTART_COUNT:-0} + 1)), '
        '${SLURM_NTASKS:-?} task(s), coordinator ${PERIJAX_COORDINATOR_HOST}: ${run[*]}"',
        "",
        "# --- time limit, stop and preemption. --signal sends USR1 to this shell before the",
        "# limit: `scancel --signal=TERM` signals the job's steps (not this shell, not srun), so",
        "# each task gets one SIGTERM, the trainer saves a checkpoint and exits 0, and the job",
        "# requeues itself; the same scancel typed by hand stops the run without requeueing. A",
        "# plain scancel or a preemption signals every process, srun included, and srun answers",
        "# SIGTERM by killing the tasks: such a job resumes from its last periodic checkpoint (or",
        "# from one taken then, where SlurmctldParameters=preempt_send_user_signal sends USR1",
        "# first). This shell ignores SIGTERM so that it outlives the tasks.",
        "requeue=0",
        "# shellcheck disable=SC2317  # (called by the trap below)",
        "on_time_limit() {",
        "  requeue=1",
        '  echo "perijax: time limit near: the tasks save a checkpoint, then the job requeues"',
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "trap on_time_limit USR1",
        "trap 'echo \"perijax: SIGTERM: waiting for the tasks to end\"' TERM",
        f'{shlex.join(srun)} bash -c "$PERIJAX_TASK" perijax-task "${{run[@]}}" &',
        "srun_pid=$!",
        'wait "$srun_pid"',
        "status=$?",
        'while kill -0 "$srun_pid" 2>/dev/null; do  # wait returned early for a signal',
        '  wait "$srun_pid"',
        "  status=$?",
        "done",
        "if [[ $requeue -eq 1 && $status -eq 0 ]]; then",
        '  echo "perijax: checkpoint saved, requeueing job ${SLURM_JOB_ID}"',
        '  scontrol requeue "$SLURM_JOB_ID"',
        "fi",
        'echo "perijax: tasks exited with status $status"',
        'exit "$status"',
    ]
    return "\n".join(lines) + "\n"


def batch_script(job: SlurmJob, command: Sequence[str]) -> str:
    """The sbatch script that runs `command` (e.g. ["perijax", "train", ...]) on every node."""
    return _render(job, [list(command)], array=False)


def array_job_script(
    run_commands: Sequence[str | Sequence[str]],
    *,
    nodes: int,
    gpus_per_node: int,
    time: str,
    log_dir: str,
    **settings: Any,
) -> str:
    """One sbatch job array with a task per run (the `perijax sweep --emit slurm` output).

    `run_commands` are shell command lines (`perijax train ... --workdir DIR`) or argv lists; each
    array task gets the same resources and the same time-limit and requeue handling as a single
    run. Each run must have its own --workdir.
    """
    runs = [shlex.split(c) if isinstance(c, str) else list(c) for c in run_commands]
    if not runs:
        raise LaunchError("a job array needs at least one run")
    workdirs = [common.parse_train_command(common.train_args_of(r)).workdir for r in runs]
    dup = {w for w in workdirs if workdirs.count(w) > 1}
    if dup:
        raise LaunchError(
            f"runs share a --workdir ({', '.join(sorted(dup))}): each run needs its own"
        )
    job = SlurmJob(nodes=nodes, gpus_per_node=gpus_per_node, time=time, log_dir=log_dir, **settings)
    validate(job, runs)
    return _render(job, runs, array=True)


def validate(job: SlurmJob, runs: Sequence[Sequence[str]]) -> None:
    """Checks the resources and every run's config against each other (LaunchError if not)."""
    if job.nodes < 1 or job.gpus_per_node < 1:
        raise LaunchError("--nodes and --gpus-per-node must be >= 1")
    limit = time_limit_seconds(job.time)
    if job.signal_lead_s < 0 or job.signal_lead_s >= limit:
        raise LaunchError(
            f"--signal-lead {job.signal_lead_s}s must be shorter than the time limit "
            f"--time {job.time} ({limit}s)"
        )
    if not re.fullmatch(r"[A-Za-z0-9._-]+", job.job_name):
        raise LaunchError(f"--job-name {job.job_name!r}: use letters, digits, '.', '_' and '-'")
    hardware = f"{job.nodes} node(s) x {job.gpus_per_node} GPU(s)"
    for run in runs:
        train = common.parse_train_command(common.train_args_of(run))
        common.check_mesh(
            train.config,
            devices=job.nodes * job.gpus_per_node,
            granules=job.nodes,
            granule="nodes",
            hardware=hardware,
        )
        common.check_batch_per_process(train.config, job.nodes)
        common.check_shared_workdir(train.workdir, hosts=job.nodes, allow_gs=False)
    common.check_shared_workdir(job.log_dir, hosts=job.nodes, allow_gs=False)


# ------------------------------------------------------------------------------------------ CLI
def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--nodes", type=int, required=True, help="number of nodes (one task each)")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default: 8)")
    p.add_argument("--time", required=True, help="time limit, HH:MM:SS or D-HH:MM:SS")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--job-name", default="perijax")
    p.add_argument("--cpus-per-task", type=int, help="CPUs for each node's task")
    p.add_argument(
        "--no-exclusive", dest="exclusive", action="store_false", help="share nodes with others"
    )
    p.add_argument(
        "--signal-lead",
        type=int,
        default=300,
        metavar="SECONDS",
        help="checkpoint and requeue this long before the time limit (default: 300)",
    )
    p.add_argument(
        "--log-dir", help="batch and per-node logs and the script (default: WORKDIR/logs)"
    )
    p.add_argument(
        "--setup",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before srun, e.g. 'source /shared/venv/bin/activate' (repeatable; "
        "default: activate the virtualenv this launcher runs in, if any)",
    )
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--gpu-settings",
        choices=("h100", "none"),
        default="h100",
        help="XLA/NCCL settings to export (default: h100; docs/launching.md)",
    )
    p.add_argument("--port", type=int, help="coordinator port (default: from the job id)")
    p.add_argument("--srun-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--sbatch-arg", action="append", default=[], metavar="ARG")
    p.add_argument(
        "--perijax",
        default="perijax",
        metavar="COMMAND",
        help="how compute nodes run perijax (default: perijax)",
    )
    p.add_argument(
        "--script", help="where to write the sbatch script (default: LOG_DIR/NAME.sbatch)"
    )
    p.add_argument("--dry-run", action="store_true", help="print the commands; write and run none")
    p.add_argument(
        "--gpu",
        choices=("h100", "h200", "a100"),
        default="h100",
        help="the nodes' GPUs, which the pre-flight compile targets (default: h100)",
    )
    common.add_preflight_argument(p)
    p.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- train ...", help="the perijax train command"
    )
    return p


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "launch-slurm",
        help="run a train command on a SLURM cluster (sbatch, N nodes x G GPUs)",
        description=__doc__.split("\n\n")[0],
    )
    configure_parser(p)
    p.set_defaults(launcher=run)
    return p


def _default_setup() -> tuple[str, ...]:
    if sys.prefix != sys.base_prefix:  # running in a virtualenv: compute nodes use the same one
        return (f"source {shlex.quote(os.path.join(sys.prefix, 'bin', 'activate'))}",)
    return ()


def job_from_args(args: argparse.Namespace, workdir: str) -> SlurmJob:
    log_dir = args.log_dir or os.path.join(workdir, "logs")
    return SlurmJob(
        nodes=args.nodes,
        gpus_per_node=args.gpus_per_node,
        time=args.time,
        log_dir=log_dir,
        job_name=args.job_name,
        partition=args.partition,
        account=args.account,
        cpus_per_task=args.cpus_per_task,
        exclusive=args.exclusive,
        signal_lead_s=args.signal_lead,
        setup=tuple(args.setup) or _default_setup(),
        env=tuple(common.parse_env(args.env)),
        gpu_settings=args.gpu_settings == "h100",
        port=args.port,
        srun_args=tuple(args.srun_arg),
        sbatch_args=tuple(args.sbatch_arg),
    )


def plan(args: argparse.Namespace) -> tuple[SlurmJob, str, str]:
    """Validates the arguments; returns the job, the script text and the script's path."""
    train = common.parse_train_command(args.argv)
    job = job_from_args(args, train.workdir)
    command = train.argv(shlex.split(args.perijax))
    validate(job, [command])
    script_path = args.script or os.path.join(job.log_dir, f"{job.job_name}.sbatch")
    return job, batch_script(job, command), script_path


def run(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    if overrides:
        return common.report(
            LaunchError("put --config.* overrides after `--`, on the train command")
        )
    try:
        job, script, path = plan(args)
        if not args.dry_run:
            sbatch = common.require_tool("sbatch", "the SLURM client submits the job")
        common.preflight(  # last: it compiles
            common.parse_train_command(args.argv),
            f"{job.nodes}x{args.gpu}x{job.gpus_per_node}",
            args.preflight,
        )
    except LaunchError as e:
        return common.report(e)
    if args.dry_run:
        print(f"# perijax launch-slurm --dry-run: would write {path} and submit it")
        print(shlex.join(["mkdir", "-p", job.log_dir]))
        print(f"cat > {shlex.quote(path)} <<'PERIJAX_SBATCH'")
        print(script, end="")
        print("PERIJAX_SBATCH")
        print(shlex.join(["sbatch", path]))
        return 0
    os.makedirs(job.log_dir, exist_ok=True)  # SLURM does not create the --output directory
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(script)
    print(f"wrote {path}", flush=True)
    return subprocess.run([sbatch, path]).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="perijax launch-slurm"))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
