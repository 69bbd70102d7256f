"""What the cluster launchers share: reading the launched `train` command, checking it against the
hardware before anything is submitted, and printing or running the commands a launch consists of.

Every check raises `LaunchError` with a one-line message; `report` turns it into
`perijax: error: ...` and exit status 2, before anything is written or started.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from perijax.cli.common import ERROR, fail, split_overrides
from perijax.cli.train import train_parser

# Directories that are local to one machine on every cluster we target: a multi-host run whose
# workdir is here would leave each host with its own partial checkpoints.
LOCAL_ONLY_PREFIXES = ("/tmp", "/var/tmp", "/dev/shm", "/run", "/scratch/local")


class LaunchError(ValueError):
    """Bad launcher input; the message is one line."""


def report(error: Exception) -> int:
    """A launcher's bad input: one line on stderr, exit status 2."""
    return fail(str(error))


def require_tool(name: str, purpose: str) -> str:
    """The absolute path of `name`, or a LaunchError that says it is missing."""
    path = shutil.which(name)
    if not path:
        raise LaunchError(
            f"{name} is not installed or not on PATH ({purpose}); use --dry-run to "
            "print the commands instead"
        )
    return path


# ------------------------------------------------------------------------- the train command
@dataclasses.dataclass(frozen=True)
class TrainCommand:
    """A `train ...` command given after `--`, with its config resolved (nothing is run)."""

    args: tuple[str, ...]  # exactly as given, starting with "train"
    config: Any  # perijax.config.Config
    workdir: str
    config_arg: str = ""  # --config FILE[:ARG] as given
    overrides: tuple[tuple[str, str], ...] = ()  # the --config.KEY=VALUE overrides

    def argv(self, perijax: Sequence[str]) -> list[str]:
        """The command line that runs it, e.g. perijax=["perijax"] or [python, -m, perijax.cli]."""
        return [*perijax, *self.args]


def strip_dashes(argv: Sequence[str]) -> list[str]:
    argv = list(argv)
    return argv[1:] if argv and argv[0] == "--" else argv


def parse_train_command(argv: Sequence[str]) -> TrainCommand:
    """Parses and resolves `train --config F --workdir W --config.x=y ...` like `perijax train`.

    The workdir is required: a launched run must restart into the same directory to resume.
    """
    from perijax import config as config_lib
    from perijax.config import ConfigError

    args = strip_dashes(argv)
    if not args:
        raise LaunchError(
            "give the command to launch after `--`, e.g. -- train --config "
            "configs/paper.py:size=400m --workdir /shared/runs/peri-400m"
        )
    if args[0] != "train":
        raise LaunchError(f"the launched command must be `train ...`, got {shlex.join(args[:2])!r}")
    try:
        rest, overrides = split_overrides(args[1:])
    except ValueError as e:
        raise LaunchError(str(e)) from e
    parser = train_parser()  # `perijax train`'s own parser: every train option is known
    try:
        known, unknown = parser.parse_known_args(rest)
    except argparse.ArgumentError as e:
        raise LaunchError(f"train: {e}") from e
    if unknown:
        raise LaunchError(f"train: unrecognized arguments: {shlex.join(unknown)}")
    if not known.workdir:
        raise LaunchError(
            "the launched train command needs --workdir, so that a restarted or "
            "requeued run resumes from the same checkpoints"
        )
    restore = getattr(known, "restore", None)
    if restore:
        overrides = [*overrides, ("checkpoint.restore", restore)]
    try:
        cfg = config_lib.load(known.config, overrides)
    except ConfigError as e:
        raise LaunchError(str(e)) from e
    if getattr(getattr(cfg, "checkpoint", None), "restore", ""):
        raise LaunchError(
            "--restore / checkpoint.restore cannot be launched: a launched run is restarted "
            "with the same command after preemption or its time limit, and an explicit restore "
            "path wins over the run's own newer checkpoints (docs/checkpointing.md); copy the "
            "checkpoint to start from into WORKDIR/checkpoints/ instead"
        )
    return TrainCommand(
        args=tuple(args),
        config=cfg,
        workdir=known.workdir,
        config_arg=known.config,
        overrides=tuple(overrides),
    )


def train_args_of(command: Sequence[str]) -> list[str]:
    """The `train ...` part of a full command line (`perijax train ...`, `python -m perijax.cli
    train ...`, with or without a leading `--`)."""
    command = list(command)
    if "train" not in command:
        raise LaunchError(f"not a perijax train command: {shlex.join(command)!r}")
    return command[command.index("train") :]


# ------------------------------------------------------------------------------- hardware checks
def check_mesh(cfg: Any, *, devices: int, granules: int, granule: str, hardware: str) -> tuple:
    """Checks the configured mesh against the devices a launch will have; returns its shape.

    `granules` are the units `mesh.dcn_data` may span (hosts for SLURM, slices for multislice
    TPU); `hardware` names the launch in the message ("4 nodes x 8 GPUs").
    """
    from perijax import sharding
    from perijax.config import ConfigError

    try:
        shape = sharding.mesh_shape(cfg.mesh, devices)
        sharding.check_model_fits_mesh(cfg.model, shape)
        sharding.grad_accum_for(
            cfg.train.global_batch_size, cfg.train.grad_accum_steps, cfg.data.seq_len, shape
        )
    except ConfigError as e:
        raise LaunchError(f"{hardware} = {devices} devices: {e}") from e
    dcn = cfg.mesh.dcn_data
    if dcn not in (1, granules):
        raise LaunchError(
            f"mesh.dcn_data={dcn} must be 1 or the number of {granule} ({granules}) for {hardware}"
        )
    if dcn > 1 and shape[0] % dcn:
        raise LaunchError(f"mesh.dcn_data={dcn} must divide mesh.data={shape[0]}")
    return shape


def add_preflight_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--preflight",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the train step for the job's chips with their own compiler before "
        "anything is submitted, and refuse a job that does not compile or fit (perijax plan "
        "--target; default: on when the compiler is installed)",
    )


def preflight(
    train: TrainCommand,
    target_name: str,
    wanted: bool | None,
    *,
    runner: Callable[[Sequence[str]], subprocess.CompletedProcess] | None = None,
) -> None:
    """Compiles `train`'s step for `target_name` with the target's own compiler (`perijax plan
    --target`, in a child process on the CPU) and raises LaunchError, in one line, when it does
    not compile, does not fit the chip, or holds an interpreted Pallas kernel. `wanted`: True
    (--preflight: the compiler must be installed), False (--no-preflight), None (when it is)."""
    import json
    import tempfile

    from perijax import targets
    from perijax.config import ConfigError
    from perijax.peaks import GIB

    if wanted is False:
        return
    try:
        target = targets.parse(target_name)
    except ConfigError as e:
        raise LaunchError(f"pre-flight: {e}") from e
    missing = targets.missing_compiler(target)
    if missing:
        if wanted:
            raise LaunchError(f"--preflight: {missing}")
        print(f"perijax: note: no pre-flight compile: {missing}", file=sys.stderr, flush=True)
        return
    print(f"pre-flight: compiling the train step for {target.describe()}...", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "plan.json")
        argv = [sys.executable, "-m", "perijax.cli", "plan", "--config", train.config_arg,
                "--target", target_name, "--json", out,
                *(f"--config.{k}={v}" for k, v in train.overrides)]  # fmt: skip
        runner = runner or (
            lambda a: subprocess.run(
                list(a),
                capture_output=True,
                text=True,
                env={**os.environ, "JAX_PLATFORMS": "cpu"},
            )
        )
        proc = runner(argv)
        if proc.returncode or not os.path.exists(out):
            lines = [x for x in (proc.stderr or "").splitlines() if x.startswith(ERROR)]
            why = lines[-1].removeprefix(ERROR) if lines else _last_line(proc.stderr)
            raise LaunchError(
                f"pre-flight: the train step does not compile for {target.name}: {why}"
            )
        with open(out) as f:
            r = json.load(f)
    peak, hbm = r["per_device"]["peak_bytes"] / GIB, r["hbm_bytes"] / GIB
    if not r["fits"]:
        raise LaunchError(
            f"pre-flight: the train step needs {peak:.1f} GiB per chip, more than the "
            f"{hbm:.0f} GiB of {target.name} (perijax plan --target {target_name} shows where "
            "it goes; more fsdp, remat=full or a smaller micro-batch lower it)"
        )
    if r["interpreted_pallas"]:
        raise LaunchError(
            f"pre-flight: the program for {target.name} holds {r['interpreted_pallas']} "
            "interpreted Pallas kernel(s), not the compiled ones"
        )
    kernels = ", ".join(f"{k} x{n}" for k, n in r["fused_attention"].items()) or "none"
    print(
        f"pre-flight: fits, {peak:.1f} of {hbm:.0f} GiB per chip; fused attention: {kernels}; "
        f"compiled by {r['compiler']} in {r['compile_s']:.0f} s",
        flush=True,
    )


def _last_line(text: str | None) -> str:
    lines = [x for x in (text or "").strip().splitlines() if x.strip()]
    return lines[-1][:300] if lines else "no output"


def check_batch_per_process(cfg: Any, processes: int) -> None:
    if cfg.train.global_batch_size % processes:
        raise LaunchError(
            f"train.global_batch_size={cfg.train.global_batch_size} must be divisible "
            f"by the number of processes ({processes})"
        )


def check_shared_workdir(
    workdir: str, *, hosts: int, allow_gs: bool, extra_local: Sequence[str] = ()
) -> None:
    """A multi-host workdir must be storage every host sees (the heuristic of docs/launching.md):
    gs:// where allowed, else an absolute path outside directories that are local to a machine."""
    if hosts <= 1:
        return
    where = f"a {hosts}-host run"
    if workdir.startswith("gs://"):
        if allow_gs:
            return
        raise LaunchError(
            f"--workdir {workdir}: {where} here needs a shared filesystem path "
            "(gs:// is accepted for TPU runs only)"
        )
    if "://" in workdir:
        raise LaunchError(f"--workdir {workdir}: unsupported URL scheme for {where}")
    if not os.path.isabs(workdir):
        raise LaunchError(
            f"--workdir {workdir} is relative: {where} needs an absolute path on "
            "storage every host mounts at the same place"
        )
    norm = os.path.normpath(workdir)
    for prefix in (*LOCAL_ONLY_PREFIXES, *extra_local):
        if norm == prefix or norm.startswith(prefix.rstrip("/") + "/"):
            raise LaunchError(
                f"--workdir {workdir} is under {prefix}, which is local to each "
                f"machine: {where} needs shared storage"
            )


def parse_env(items: Sequence[str]) -> list[tuple[str, str]]:
    """`--env KEY=VALUE` items, checked to be valid shell variable names."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise LaunchError(f"--env {item!r}: expected KEY=VALUE with KEY a variable name")
        pairs.append((key, value))
    return pairs


# ------------------------------------------------------------------------------ run or print
@dataclasses.dataclass(frozen=True)
class Step:
    """One command of a launch: an argv to run, or a note printed as a shell comment."""

    argv: tuple[str, ...] = ()
    note: str = ""

    def shell(self) -> str:
        return f"# {self.note}" if self.note else shlex.join(self.argv)


def command(*argv: str) -> Step:
    return Step(argv=tuple(argv))


def note(text: str) -> Step:
    return Step(note=text)


def print_steps(steps: Sequence[Step], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    for step in steps:
        print(step.shell(), file=out)


def run_steps(steps: Sequence[Step], runner: Callable[[Sequence[str]], int] | None = None) -> int:
    """Runs the commands in order, echoing each; stops at the first failure and returns its
    status."""
    runner = runner or (lambda argv: subprocess.run(list(argv)).returncode)
    for step in steps:
        print(f"+ {step.shell()}" if not step.note else step.shell(), flush=True)
        if step.argv:
            status = runner(step.argv)
            if status:
                return fail(f"exited with status {status}: {step.argv[0]} ...", code=status)
    return 0
