"""The gcloud steps and the worker scripts behind `perijax launch-tpu` (perijax.launchers.tpu
is its command line, whose docstring has the usage): the TPU types, the create / install / run /
delete steps, and the run-with-restarts loop.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from perijax import targets
from perijax.cli.common import fail
from perijax.launchers import common
from perijax.launchers.common import LaunchError, Step, command, note
from perijax.targets import TpuType

REMOTE_SRC = "$HOME/perijax"  # the source tree on each worker (`install`)
REMOTE_VENV = "$HOME/perijax-venv"  # kept across installs, so reinstalling is quick
REMOTE_LOGS = "$HOME/perijax-logs"
TARBALL = "perijax-src.tar.gz"
DEFAULT_SETUP = (f'cd "{REMOTE_SRC}"', f'source "{REMOTE_VENV}/bin/activate"')
# Queued-resource and TPU VM states in which a failed run is the run's own failure, not the
# machine's (anything else: preempted, suspended, deleted, ...).
HEALTHY = {"READY", "ACTIVE"}


# --------------------------------------------------------------------------- accelerator types
def tpu_type(text: str) -> TpuType:
    """Parses v4-32, v5p-64, v5litepod-16 (or v5e-16), v6e-16 (perijax.targets.tpu_type)."""
    try:
        return targets.tpu_type(text)
    except ValueError as e:
        raise LaunchError(f"--accelerator-type {e}") from e


# --------------------------------------------------------------------------------- the target
@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU, where, and how it was (or is to be) created."""

    name: str
    zone: str
    project: str
    num_slices: int = 1
    queued: bool = False  # a queued resource rather than a plain TPU VM (always for multislice)

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    @property
    def uses_queue(self) -> bool:
        return self.queued or self.multislice

    def where(self) -> list[str]:
        return [f"--zone={self.zone}", f"--project={self.project}"]

    def ssh(self, remote: str, *, output_directory: str | None = None) -> list[str]:
        """gcloud ssh running `remote` on every worker (of every slice)."""
        if self.multislice:
            argv = ["gcloud", "compute", "tpus", "queued-resources", "ssh", self.name]
            argv += [*self.where(), "--node=all", "--worker=all"]
        else:
            argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name]
            argv += [*self.where(), "--worker=all"]
        argv.append(f"--command={remote}")
        if output_directory:
            argv.append(f"--output-directory={output_directory}")
        return argv

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        kind = "queued-resources" if self.multislice else "tpu-vm"
        argv = ["gcloud", "compute", "tpus", kind, "scp", local, f"{self.name}:{remote}"]
        argv += self.where()
        return [*argv, "--node=all", "--worker=all"] if self.multislice else [*argv, "--worker=all"]

    def describe_state(self) -> list[str]:
        if self.uses_queue:
            return [
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "describe",
                self.name,
                *self.where(),
                "--format=value(state.state)",
            ]
        return [
            "gcloud",
            "compute",
            "tpus",
            "tpu-vm",
            "describe",
            self.name,
            *self.where(),
            "--format=value(state)",
        ]


def create_steps(target: Target, accel: TpuType, *, runtime: str | None, spot: bool) -> list[Step]:
    runtime = runtime or accel.runtime
    if target.uses_queue:
        argv = [
            "gcloud",
            "compute",
            "tpus",
            "queued-resources",
            "create",
            target.name,
            *target.where(),
            f"--accelerator-type={accel.name}",
            f"--runtime-version={runtime}",
        ]
        if target.multislice:
            argv += [f"--node-count={target.num_slices}", f"--node-prefix={target.name}"]
        else:
            argv.append(f"--node-id={target.name}")
        if spot:
            argv.append("--spot")
        return [
            command(*argv),
            note("a queued resource is granted when there is capacity; its state is ACTIVE then"),
            command(*target.describe_state()),
        ]
    argv = [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        target.name,
        *target.where(),
        f"--accelerator-type={accel.name}",
        f"--version={runtime}",
    ]
    if spot:
        argv.append("--spot")
    return [command(*argv)]


def delete_steps(target: Target) -> list[Step]:
    if target.uses_queue:  # --force also deletes the slices the queued resource holds
        return [
            command(
                "gcloud",
                "compute",
                "tpus",
                "queued-resources",
                "delete",
                target.name,
                *target.where(),
                "--force",
                "--quiet",
            )
        ]
    return [
        command(
            "gcloud", "compute", "tpus", "tpu-vm", "delete", target.name, *target.where(), "--quiet"
        )
    ]


def list_steps(zone: str, project: str) -> list[Step]:
    where = [f"--zone={zone}", f"--project={project}"]
    return [
        command("gcloud", "compute", "tpus", "tpu-vm", "list", *where),
        command("gcloud", "compute", "tpus", "queued-resources", "list", *where),
    ]


def default_source() -> str | None:
    """The repository this perijax runs from, if it is a source checkout."""
    root = Path(__file__).resolve().parents[2]
    return str(root) if (root / "pyproject.toml").is_file() else None


def install_script(python: str) -> str:
    """Per worker: unpack the copied source tree and pip-install it with the TPU jax build."""
    return "\n".join(
        [
            "set -euo pipefail",
            f"if ! command -v {python} >/dev/null; then  # TPU VM images ship an older Python",
            "  sudo apt-get update -qq",
            f"  sudo apt-get install -y -qq {python} {python}-venv",
            "fi",
            f'rm -rf "{REMOTE_SRC}"',
            f'mkdir -p "{REMOTE_SRC}"',
            f'tar -xzf "$HOME/{TARBALL}" -C "{REMOTE_SRC}"',
            f'[[ -x "{REMOTE_VENV}/bin/python" ]] || {python} -m venv "{REMOTE_VENV}"',
            f'"{REMOTE_VENV}/bin/pip" install -q --upgrade pip',
            f'"{REMOTE_VENV}/bin/pip" install -q -e "{REMOTE_SRC}[tpu,gcs]"',
            'echo "$(hostname): perijax installed"',
        ]
    )


def install_steps(target: Target, source: str, python: str = "python3.11") -> list[Step]:
    tarball = os.path.join(tempfile.gettempdir(), f"perijax-{target.name}-src.tar.gz")
    excluded = (".git", ".venv", "runs", "tpu-logs", "__pycache__", "*.egg-info")
    return [
        command("tar", "-czf", tarball, *[f"--exclude={x}" for x in excluded], "-C", source, "."),
        command(*target.scp_to_all(tarball, TARBALL)),
        command(*target.ssh(install_script(python))),
    ]


# ------------------------------------------------------------------------------------- running
def run_name_of(workdir: str) -> str:
    """A file-name-safe name for a run, from its workdir (…/runs/peri-400m -> peri-400m)."""
    base = os.path.basename(workdir.rstrip("/")) or "run"
    return re.sub(r"[^A-Za-z0-9._-]", "_", base)


def run_script(
    command_argv: Sequence[str],
    *,
    run_name: str,
    setup: Sequence[str] = DEFAULT_SETUP,
    env: Sequence[tuple[str, str]] = (),
    detach: bool = False,
) -> str:
    """Per worker: start the command with its output appended to ~/perijax-logs/RUN.log and its
    pid in ~/perijax-logs/current.pid (for `stop`), then (unless `detach`) stream the log until
    it exits and exit with its status.

    The trainer runs apart from the ssh session (hangups ignored, output to the log, not to ssh),
    so a dropped connection does not stop it; `exec` keeps the recorded pid the trainer's own.
    """
    start = f'echo "$BASHPID" > "$logs/current.pid"; exec {shlex.join(command_argv)}'
    lines = [
        "set -euo pipefail",
        f'logs="{REMOTE_LOGS}"',
        'mkdir -p "$logs"',
        f'log="$logs/{run_name}.log"',
        'touch "$log"',
        'ln -sfn "$log" "$logs/current.log"',
        *setup,
        *[f"export {k}={shlex.quote(v)}" for k, v in env],
    ]
    launch = f'( trap "" HUP; {start} ) >> "$log" 2>&1 < /dev/null &'
    if detach:
        lines += [launch, 'echo "$(hostname): started, log $log"']
    else:
        lines += [
            'offset=$(($(stat -c %s "$log") + 1))  # stream what this run writes',
            launch,
            "pid=$!",
            'tail -c "+$offset" --pid="$pid" -f "$log" &',
            "status=0",
            'wait "$pid" || status=$?',
            "wait  # for tail to print the last lines",
            'exit "$status"',
        ]
    return "\n".join(lines)


STOP_SCRIPT = "\n".join(
    [
        f'pidfile="{REMOTE_LOGS}/current.pid"',
        'if [[ -f "$pidfile" ]] && kill -TERM "$(cat "$pidfile")" 2>/dev/null; then',
        '  echo "$(hostname): sent SIGTERM; perijax saves a checkpoint and exits"',
        "else",
        '  echo "$(hostname): no perijax run"',
        "fi",
    ]
)


def logs_script(run_name: str | None) -> str:
    return f'cat "{REMOTE_LOGS}/{run_name or "current"}.log"'


def check_run(train: common.TrainCommand, target: Target, accel: TpuType) -> None:
    devices = accel.chips * target.num_slices
    hosts = accel.hosts * target.num_slices
    slices = f" x {target.num_slices} slices" if target.multislice else ""
    hardware = f"{accel.name}{slices} ({accel.chips} chips on {accel.hosts} host(s) per slice)"
    if target.multislice:
        common.check_mesh(
            train.config,
            devices=devices,
            granules=target.num_slices,
            granule="slices",
            hardware=hardware,
        )
    else:
        common.check_mesh(
            train.config, devices=devices, granules=accel.hosts, granule="hosts", hardware=hardware
        )
    common.check_batch_per_process(train.config, hosts)
    # A TPU VM's home directory is its own boot disk, not shared with the other workers.
    common.check_shared_workdir(
        train.workdir, hosts=hosts, allow_gs=True, extra_local=("/home", "/root")
    )


def local_log_dir(log_dir: str | None, target: Target, run_name: str) -> str:
    return log_dir or os.path.join("tpu-logs", target.name, run_name)


def run_steps_for(
    train: common.TrainCommand,
    target: Target,
    *,
    perijax: Sequence[str],
    setup: Sequence[str],
    env: Sequence[tuple[str, str]],
    detach: bool,
    log_dir: str | None,
    run_name: str | None = None,
) -> tuple[list[Step], Step]:
    """The commands that start one run: (preparation, the ssh that runs it)."""
    name = run_name or run_name_of(train.workdir)
    script = run_script(train.argv(perijax), run_name=name, setup=setup, env=env, detach=detach)
    if detach or target.multislice:  # worker-side logs only (`logs` fetches them)
        return [], command(*target.ssh(script))
    local = local_log_dir(log_dir, target, name)
    return (
        [command("mkdir", "-p", local), note(f"one log per worker: {local}/WORKER.log")],
        command(*target.ssh(script, output_directory=local)),
    )


def per_run_commands(
    run_commands: Sequence[str | Sequence[str]],
    *,
    name: str,
    zone: str,
    project: str,
    accelerator_type: str,
    num_slices: int = 1,
    names: Sequence[str] | None = None,
    perijax: Sequence[str] = ("perijax",),
    setup: Sequence[str] = DEFAULT_SETUP,
    env: Sequence[tuple[str, str]] = (),
    log_dir: str = "tpu-logs",
) -> list[str]:
    """One shell command line per run (the `perijax sweep --emit tpu` output): each runs its
    `perijax train ...` on all workers of TPU `name` (or of `names[i]`, one TPU per run), in the
    foreground, with one local log per worker under LOG_DIR/TPU/RUN/. Runs on one TPU go one
    after another; every run must have its own --workdir."""
    runs = [shlex.split(c) if isinstance(c, str) else list(c) for c in run_commands]
    if names is not None and len(names) != len(runs):
        raise LaunchError(f"{len(names)} TPU names for {len(runs)} runs")
    if not zone or not project:
        raise LaunchError("TPU runs need a zone and a project")
    accel = tpu_type(accelerator_type)
    trains = [common.parse_train_command(common.train_args_of(r)) for r in runs]
    workdirs = [t.workdir for t in trains]
    dup = sorted({w for w in workdirs if workdirs.count(w) > 1})
    if dup:
        raise LaunchError(f"runs share a --workdir ({', '.join(dup)}): each run needs its own")
    lines = []
    for i, train in enumerate(trains):
        target = Target(names[i] if names else name, zone, project, num_slices=num_slices)
        check_run(train, target, accel)
        run_name = run_name_of(train.workdir)
        prep, ssh = run_steps_for(
            train,
            target,
            perijax=perijax,
            setup=setup,
            env=env,
            detach=False,
            log_dir=os.path.join(log_dir, target.name, run_name),
        )
        lines.append(" && ".join(s.shell() for s in [*prep, ssh] if s.argv))
    return lines


# ------------------------------------------------------------------------- restart on preemption
def run_with_restarts(
    run: Step,
    target: Target,
    recreate: Sequence[Step],
    *,
    max_restarts: int,
    execute: Callable[[Sequence[str]], int],
    query: Callable[[Sequence[str]], str | None],
    poll_s: float = 30.0,
) -> int:
    """Runs `run`; when it fails because the TPU went away (preempted, suspended, deleted), runs
    `recreate` (delete, create, install) and `run` again, up to `max_restarts` times."""
    restarts = 0
    while True:
        print(f"+ {run.shell()}", flush=True)
        status = execute(run.argv)
        if status == 0:
            return 0
        state = query(target.describe_state())
        if state in HEALTHY:
            if status == 255:  # ssh's own status: the connection, not the run, ended
                return fail(
                    f"the ssh session ended but TPU {target.name} is {state}: the trainer may "
                    "still run there (`logs` to see, `stop` to stop it)",
                    code=status,
                )
            return fail(
                f"the run failed with status {status} on a healthy TPU ({state}); not restarting",
                code=status,
            )
        if restarts >= max_restarts:
            return fail(
                f"TPU {target.name} is {state or 'gone'} and --max-restarts={max_restarts} is "
                "used up",
                code=status or 1,
            )
        restarts += 1
        print(
            f"perijax: TPU {target.name} is {state or 'gone'}: recreating it and resuming "
            f"(restart {restarts}/{max_restarts})",
            flush=True,
        )
        for step in recreate:
            if step.note:
                print(step.shell(), flush=True)
                continue
            print(f"+ {step.shell()}", flush=True)
            if step.argv == tuple(target.describe_state()):  # wait for a queued resource
                while query(step.argv) != "ACTIVE":
                    time.sleep(poll_s)
                continue
            code = execute(step.argv)
            if code and "delete" not in step.argv:  # deleting what is already gone may fail
                return fail(f"exited with status {code}: {step.shell()}", code=code)
