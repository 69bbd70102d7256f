"""`perijax sweep`: run a grid of experiments (e.g. ln_placement x lr x seed) over a base config,
one workdir per run: sequentially on this machine, or as one `perijax train` command per run for
a cluster to launch.

    perijax sweep --sweep configs/sweeps/smoke.py --root runs/smoke
    perijax sweep --sweep configs/sweeps/smoke.py --root /shared/runs/smoke --emit commands

A sweep file defines `get_sweep()` returning a dict (or ConfigDict) with `base` (a config spec,
`configs/tiny.py` or `configs/paper.py:size=400m`), `overrides` ({"section.key": value} for every
run), `grid` ({"section.key": [values]}, expanded as a cartesian product in the order written) and
optionally `name`. Each run lives in ROOT/RUN_NAME, where RUN_NAME lists its grid values
(`ln_placement=peri,lr=0.002,seed=1`), and ends with ROOT/RUN_NAME/status.json. Rerunning the same
command skips finished runs and resumes the others from their checkpoints. docs/experiments.md
has the recipes.

Over 500 lines on purpose: running, resuming and emitting a sweep share the on-disk rules (run
names, status.json, sweep.json, what makes an existing run comparable); the grid syntax itself
lives in perijax.experiments.grid.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax.cli.common import fail
from perijax.config import TRACKING_KEYS, ConfigError
from perijax.experiments import runlog
from perijax.experiments.grid import (
    Run,
    Sweep,
    build_configs,
    load_sweep,
    select,
    value_text,
    with_root,
)
from perijax.launchers.common import LaunchError

STATUS_FILE = "status.json"
SWEEP_FILE = "sweep.json"
LOG_FILE = "train.log"
FINISHED = ("done", "diverged")  # results: never rerun; "failed" runs are retried
# Settings that change how a run executes, not what it computes: they may differ when a sweep is
# resumed (another machine, another cache) without making the finished runs incomparable.
EXECUTION_KEYS = ("data.cache_dir", "data.num_threads", "data.prefetch", *TRACKING_KEYS)
EXECUTION_SECTIONS = ("checkpoint", "mesh", "distributed")


def refine_runs(sweep: Sweep, root: Path) -> tuple[list[Run] | None, list[str]]:
    """The refine stage's runs, or None while some grid run has not finished (done/diverged),
    with one note per setting: which value was best and why.

    Settings are the grid's values of every key except `best` and the refine grid's keys, in
    grid order. In each, the value of `best` is chosen as `perijax report` chooses the best
    learning rate (`runlog.best_of`): the lowest mean final metric among the values whose
    finished runs were all stable (without diverging or blowing up, report.is_stable); a
    setting where no value qualifies gets no runs. Runs the grid already has are not repeated.
    """
    refine = sweep.refine
    grid_runs = sweep.runs()
    if refine is None:
        return [], []
    if any(run_state(root / r.name) not in FINISHED for r in grid_runs):
        return None, []
    fixed = [k for k in sweep.grids[0] if k != refine.best and k not in refine.grid]
    settings: dict[tuple, dict[Any, list[runlog.RunResult]]] = {}
    for run in grid_runs:
        by_value = settings.setdefault(tuple(value_text(run.values[k]) for k in fixed), {})
        by_value.setdefault(run.values[refine.best], []).append(runlog.load_run(root / run.name))
    names = {r.name for r in grid_runs}
    runs, notes = [], []
    for setting, by_value in settings.items():
        label = ",".join(f"{k.rpartition('.')[2]}={v}" for k, v in zip(fixed, setting, strict=True))
        best = runlog.best_of(by_value, refine.metric)
        if best.key is None:
            notes.append(f"{label or 'all runs'}: no run was stable, nothing to refine")
            continue
        notes.append(
            f"{label or 'all runs'}: best {refine.best}={value_text(best.key)} "
            f"({refine.metric} {best.mean:.4f})"
        )
        template = next(
            r.values
            for r in grid_runs
            if r.values[refine.best] == best.key
            and tuple(value_text(r.values[k]) for k in fixed) == setting
        )
        for combo in itertools.product(*refine.grid.values()):
            values = {**template, **dict(zip(refine.grid, combo, strict=True))}
            run = sweep.run(len(grid_runs) + len(runs), values)
            if run.name not in names:
                names.add(run.name)
                runs.append(run)
    return runs, notes


# ------------------------------------------------------------------------------ run state
def run_state(run_dir: Path) -> str:
    """done | diverged | failed from status.json; without one (a run launched from an emitted
    command, or a sweep killed between a run's end and its status), done or diverged as
    inferred from its metrics, else started (interrupted or still running) or pending."""
    status = read_status(run_dir)
    if status is not None:
        return str(status.get("state", "failed"))
    return runlog.load_run(run_dir).state if run_dir.is_dir() else "pending"


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / STATUS_FILE).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {"state": "failed", "error": f"unreadable {run_dir / STATUS_FILE}"}


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    flat = {
        f"{section}.{key}": value
        for section, values in config.items()
        if section not in EXECUTION_SECTIONS and isinstance(values, dict)
        for key, value in values.items()
    }
    return {k: v for k, v in flat.items() if k not in EXECUTION_KEYS}


def check_existing(root: Path, runs: Sequence[Run], configs: dict[str, Any]) -> None:
    """A run folder left by an earlier invocation must hold the same experiment: resuming it (or
    skipping it as finished) under changed settings would mix two experiments in one result.

    Compares the keys both configs have (a key added to the schema since is not a change) and
    `model.dtype` only where it is not `auto` (the trainer writes the dtype `auto` resolved to).
    """
    from perijax.config import to_dict

    for run in runs:
        try:
            old = json.loads((root / run.name / "config.json").read_text())
        except (OSError, ValueError):
            continue
        new = _comparable(to_dict(configs[run.name]))
        old = _comparable(old)
        if new.get("model.dtype") == "auto":
            new.pop("model.dtype")
        for key in sorted(set(new) & set(old)):
            if new[key] != old[key]:
                raise ConfigError(
                    f"{root / run.name} was run with {key}={old[key]!r}, this sweep sets "
                    f"{new[key]!r}: use another --root, or delete that run to redo it"
                )


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Writes atomically (a killed sweep never leaves half a status file)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(runlog.jsonable(payload), indent=2) + "\n")
    os.replace(tmp, path)


def sweep_record(sweep: Sweep, runs: Sequence[Run]) -> dict[str, Any]:
    """The content of ROOT/sweep.json: what was asked for, and the expanded grid (with the
    refine stage's runs once they are known)."""
    record = {
        "name": sweep.name,
        "base": sweep.base,
        "overrides": sweep.overrides,
        "command_line_overrides": dict(sweep.extra),
        "grid": sweep.grids[0] if len(sweep.grids) == 1 else list(sweep.grids),
        "runs": [{"index": r.index, "name": r.name, "values": r.values} for r in runs],
    }
    if sweep.refine is not None:
        record["refine"] = dataclasses.asdict(sweep.refine)
    return record


# --------------------------------------------------------------------------- the outcome
_STEP_IN_MESSAGE = re.compile(r"\bstep (\d+)")


def outcome(
    rows: list[dict[str, Any]],
    *,
    diverged_error: str | None = None,
    error: str | None = None,
    seconds: float = 0.0,
) -> dict[str, Any]:
    """The status.json of a run that returned (no error), raised TrainingDiverged
    (`diverged_error`) or raised anything else (`error`), from its metrics rows.

    Diverged: TrainingDiverged, or a non-finite final train or eval loss (with the guard on, a
    run can finish with every late step skipped). The step is the first logged non-finite train
    loss, else the step named in the trainer's message, else the last logged step.
    """
    final = runlog.final_metrics(rows)
    losses = [final.get("train/loss"), final.get("eval/loss")]
    nonfinite = any(v is not None and not math.isfinite(v) for v in losses)
    state, at = "done", None
    if diverged_error is not None or (error is None and nonfinite):
        state = "diverged"
        at = runlog.first_nonfinite_step(rows)
        match = _STEP_IN_MESSAGE.search(diverged_error or "")
        if at is None and match:
            at = int(match.group(1))
        if at is None and rows:
            at = int(rows[-1]["step"])
    elif error is not None:
        state = "failed"
    status: dict[str, Any] = {"state": state, "diverged_at_step": at, "final": final}
    if diverged_error is not None:
        status["message"] = diverged_error
    if error is not None:
        status["error"] = error
    status["seconds"] = round(seconds, 1)
    return status


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# ----------------------------------------------------------------------------- emitting
def run_commands(
    sweep: Sweep,
    root: str | os.PathLike,
    *,
    runs: Sequence[Run] | None = None,
    perijax: Sequence[str] = ("perijax",),
    include_finished: bool = False,
) -> list[str]:
    """One shell-quoted `perijax train --config BASE --workdir ROOT/NAME --config.k=v ...` line
    per run that has not finished (status done/diverged) under `root`.

    Each line builds exactly the config the sequential sweep would (same overrides, same order)
    and resumes from its workdir's checkpoints when relaunched. The cluster launchers wrap these
    lines: `perijax.launchers.slurm.array_job_script(lines, ...)` (one array task per run) and
    `perijax.launchers.tpu_steps`'s per-run command lines.
    """
    root = Path(root)
    lines = []
    for run in sweep.runs() if runs is None else runs:
        if not include_finished and run_state(root / run.name) in FINISHED:
            continue
        argv = [*perijax, "train", "--config", sweep.base, "--workdir", str(root / run.name)]
        argv += [f"--config.{key}={text}" for key, text in with_root(run.overrides, root)]
        lines.append(shlex.join(argv))
    return lines


# ------------------------------------------------------------------------------ running
def emit(args: argparse.Namespace, lines: list[str]) -> list[str]:
    """The `--emit` output for the unfinished runs' `perijax train` lines."""
    if args.emit == "commands" or not lines:
        return lines
    if args.emit == "slurm":
        from perijax.launchers import slurm

        script = slurm.array_job_script(
            lines,
            nodes=args.nodes,
            gpus_per_node=args.gpus_per_node,
            time=args.time,
            log_dir=args.log_dir,
        )
        return [script]
    from perijax.launchers import tpu_steps

    return tpu_steps.per_run_commands(
        lines,
        name=args.tpu or "",
        zone=args.zone or "",
        project=args.project or "",
        accelerator_type=args.accelerator_type or "",
    )


def _load_all_data(
    configs: dict[str, Any], log: Callable[[str], None], have: dict[tuple, Any] | None = None
) -> dict[tuple, Any]:
    """Loads each distinct data setting once (checked before any run; shared by the runs), but
    none that `have` holds already."""
    from perijax import train as train_lib

    data = {}
    for cfg in configs.values():
        key = _data_key(cfg)
        if key not in data and key not in (have or {}):
            data[key] = train_lib.load_data(cfg, log)
    return data


def _unfinished(configs: dict[str, Any], root: Path) -> dict[str, Any]:
    """The configs of the runs that will train (not done or diverged): only their data loads."""
    return {name: cfg for name, cfg in configs.items() if run_state(root / name) not in FINISHED}


def _data_key(cfg: Any) -> tuple:
    d = cfg.data
    return (d.source, d.path, cfg.model.vocab_size, d.cache_dir, d.val_fraction, cfg.train.seed)


def _check_devices(configs: dict[str, Any]) -> None:
    """Mesh and batch against this machine's devices, before any run starts."""
    from perijax import train as train_lib
    from perijax.model import check_backend

    for name, cfg in configs.items():
        try:
            check_backend(cfg.model)
            train_lib.setup(cfg)
        except ConfigError as e:
            raise ConfigError(f"run {name}: {e}") from e


def _fmt_loss(status: dict[str, Any]) -> str:
    final = status.get("final", {})
    parts = []
    for key, label in (("train/loss", "loss"), ("eval/loss", "eval")):
        if key in final:  # status.json writes non-finite values as "nan", "inf"
            parts.append(f"{label} {float(final[key]):.4f}")
    return "  ".join(parts)


def _end_line(status: dict[str, Any]) -> str:
    state = status["state"]
    if state == "diverged":
        return f"diverged at step {status['diverged_at_step']}  {_fmt_loss(status)}".rstrip()
    if state == "failed":
        return f"failed: {status.get('error', '')}"
    return f"done  {_fmt_loss(status)}".rstrip()


def run_sweep(
    sweep: Sweep,
    root: str | os.PathLike,
    *,
    only: Sequence[str] = (),
    out: Callable[[str], None] = print,
    verbose: bool = False,
) -> int:
    """Runs the selected runs one after another in this process, then the refine stage's runs
    once the grid has finished; returns the exit status (0: every run done or diverged; 1: some
    failed; 0 after a signal, like `perijax train`: the interrupted run saved a checkpoint and
    the same command resumes it).

    Raises ConfigError, before anything is written, for a bad grid value, a mesh that does not
    fit this machine, unusable data or a run folder holding a different experiment.
    """
    root = Path(root)
    runs = select(sweep.runs(), only, allow_none=sweep.refine is not None)
    configs = _prepare(sweep, root, runs)
    data = _load_all_data(_unfinished(configs, root), log=lambda s: out(f"data: {s}"))
    try:
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / SWEEP_FILE, sweep_record(sweep, sweep.runs()))
    except OSError as e:
        raise ConfigError(f"cannot write to sweep root {root}: {e.strerror}") from e
    failed = _run_each(sweep.name, root, runs, configs, data, out=out, verbose=verbose)
    if isinstance(failed, _Stopped):
        return failed.code
    if sweep.refine is not None:
        more, notes = refine_runs(sweep, root)
        if more is None:
            out("refine: waits until every grid run has finished; rerun the same command then")
            more = []
        for note in notes:
            out(f"refine: {note}")
        if notes:
            _write_json(root / SWEEP_FILE, sweep_record(sweep, sweep.runs() + more))
        more = select(more, only, allow_none=True)
        configs = _prepare(sweep, root, more)
        unfinished = _unfinished(configs, root)
        data.update(_load_all_data(unfinished, log=lambda s: out(f"data: {s}"), have=data))
        failed_more = _run_each("refine", root, more, configs, data, out=out, verbose=verbose)
        if isinstance(failed_more, _Stopped):
            return failed_more.code
        failed += failed_more
        runs = runs + more
    final = {s: 0 for s in ("done", "diverged", "failed")}
    for run in runs:
        state = run_state(root / run.name)
        final[state] = final.get(state, 0) + 1
    out(
        f"sweep {sweep.name}: {final['done']} done, {final['diverged']} diverged, "
        f"{final['failed']} failed; perijax report {shlex.quote(str(root))}"
    )
    return 1 if failed else 0


@dataclasses.dataclass(frozen=True)
class _Stopped:
    """The sweep stopped early (a signal, Ctrl-C) with this exit status."""

    code: int


def _prepare(sweep: Sweep, root: Path, runs: Sequence[Run]) -> dict[str, Any]:
    """Every run's config, checked against this machine and any earlier run folder."""
    configs = build_configs(sweep, runs, root)
    _check_devices(configs)
    check_existing(root, runs, configs)
    return configs


def _run_each(
    stage: str,
    root: Path,
    runs: Sequence[Run],
    configs: dict[str, Any],
    data: dict[tuple, Any],
    *,
    out: Callable[[str], None],
    verbose: bool,
) -> int | _Stopped:
    """Runs the unfinished `runs` of a sweep `stage` (its name, or "refine") in order; returns
    how many failed, or _Stopped."""
    from perijax import train as train_lib
    from perijax.metrics import format_duration

    if not runs:
        return 0
    states = {r.name: run_state(root / r.name) for r in runs}
    todo = [r for r in runs if states[r.name] not in FINISHED]
    counts = {s: sum(v == s for v in states.values()) for s in ("done", "diverged")}
    out(
        f"sweep {stage}: {len(runs)} runs in {root} ({counts['done']} done, "
        f"{counts['diverged']} diverged, {len(todo)} to run)"
    )
    durations: list[float] = []
    failed = 0
    width = len(str(len(runs)))
    for i, run in enumerate(runs, start=1):
        tag = f"[{i:>{width}}/{len(runs)}] {run.name}"
        run_dir = root / run.name
        if states[run.name] in FINISHED:
            status = read_status(run_dir)
            if status is None:  # finished elsewhere: record it as the sweep would have
                status = outcome(runlog.read_metrics(run_dir / "metrics.jsonl"))
                status.update(inferred=True, overrides=dict(run.overrides))
                _write_json(run_dir / STATUS_FILE, status)
            out(f"{tag}  skip: {_end_line(status)}")
            continue
        run_dir.mkdir(parents=True, exist_ok=True)
        resumed = " (resuming)" if states[run.name] in ("started", "failed") else ""
        out(f"{tag}  start{resumed}")
        t0 = time.perf_counter()
        diverged_error = error = None
        with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log_file:

            def log(line: str, _file=log_file) -> None:
                _file.write(line + "\n")
                _file.flush()
                if verbose:
                    out(f"    {line}")

            try:
                result = train_lib.train(
                    configs[run.name], run_dir, data=data[_data_key(configs[run.name])], log=log
                )
                if result["preempted"]:
                    out(f"{tag}  stopped by a signal at a saved checkpoint: rerun to resume")
                    return _Stopped(0)
            except train_lib.TrainingDiverged as e:
                diverged_error = str(e)
            except KeyboardInterrupt:
                out(f"{tag}  interrupted: rerun the same command to resume")
                return _Stopped(130)
            except Exception as e:  # one bad run must not stop the sweep: record it, go on
                error = _one_line(e)
                log(f"error: {error}")
        seconds = time.perf_counter() - t0
        rows = runlog.read_metrics(run_dir / "metrics.jsonl")
        status = outcome(rows, diverged_error=diverged_error, error=error, seconds=seconds)
        status["overrides"] = dict(run.overrides)
        _write_json(run_dir / STATUS_FILE, status)
        failed += status["state"] == "failed"
        durations.append(seconds)
        left = sum(1 for r in runs[i:] if states[r.name] not in FINISHED)
        eta = sum(durations) / len(durations) * left
        out(f"{tag}  {_end_line(status)}  {format_duration(seconds)}  eta {format_duration(eta)}")
        _release_compiled()
    return failed


def _release_compiled() -> None:
    """Drops JAX's in-memory compiled programs between runs: each run's programs close over its
    own optimizer and model graph, so no later run could reuse them, and keeping them grows
    memory by every run of a long sweep. Runs that compile the same program (seeds of one
    setting) still share it through the persistent compilation cache."""
    import jax

    jax.clear_caches()


def enable_compilation_cache() -> None:
    """Turns on JAX's persistent compilation cache unless it is configured already, so the
    seeds of one setting (identical programs) compile once: under $PERIJAX_CACHE/jax, else
    ~/.cache/perijax/jax. JAX_COMPILATION_CACHE_DIR overrides it."""
    import jax

    if jax.config.jax_compilation_cache_dir:
        return
    base = os.environ.get("PERIJAX_CACHE") or os.path.join(Path.home(), ".cache", "perijax")
    jax.config.update("jax_compilation_cache_dir", os.path.join(base, "jax"))


# ----------------------------------------------------------------------------- the command
def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "sweep",
        help="run a grid of experiments (placement x lr x seed, ...), or print their commands",
        description="Run every point of a sweep file's grid, one workdir per run under --root, "
        "one after another; rerunning skips finished runs and resumes the others. "
        "--config.SECTION.KEY=VALUE applies to every run.",
    )
    p.add_argument("--sweep", required=True, metavar="FILE", help="sweep file (get_sweep())")
    p.add_argument("--root", help="folder of the runs (default: runs/<sweep name>)")
    p.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only runs whose name contains PATTERN (wildcards allowed; repeatable)",
    )
    p.add_argument(
        "--emit",
        choices=["commands", "slurm", "tpu"],
        help="instead of running: print one `perijax train` command per unfinished run "
        "(commands), an sbatch job array with a task per run (slurm), or one command per run "
        "that trains it on every worker of a Cloud TPU (tpu)",
    )
    cluster = p.add_argument_group("--emit slurm")
    cluster.add_argument("--nodes", type=int, default=1, help="nodes per run")
    cluster.add_argument("--gpus-per-node", type=int, default=8)
    cluster.add_argument("--time", default="24:00:00", help="time limit per array task")
    cluster.add_argument("--log-dir", default="slurm-logs", help="per-node log folder")
    tpu = p.add_argument_group("--emit tpu")
    tpu.add_argument("--tpu", metavar="NAME", help="TPU VM (or queued resource) name")
    tpu.add_argument("--zone")
    tpu.add_argument("--project")
    tpu.add_argument("--accelerator-type", metavar="TYPE", help="e.g. v5p-128, v5litepod-16")
    p.add_argument(
        "--dry-run", action="store_true", help="list the runs and their states; run nothing"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="also print each run's log")
    return p


def run(args: argparse.Namespace, overrides: list[tuple[str, str]]) -> int:
    """Entry point of `perijax sweep`: bad input is one line on stderr and exit status 2."""

    try:
        sweep = load_sweep(args.sweep, overrides)
        root = Path(args.root or os.path.join("runs", sweep.name))
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--root {root} exists and is not a directory")
        runs = select(sweep.runs(), args.only, allow_none=sweep.refine is not None)
        if args.emit or args.dry_run:
            if sweep.refine is not None:
                more, _ = refine_runs(sweep, root)
                if more is None:
                    print(
                        "perijax: note: the refine stage's runs are chosen once every grid run "
                        "has finished: list them again then",
                        file=sys.stderr,
                    )
                runs += select(more or [], args.only, allow_none=True)
            configs = build_configs(sweep, runs, root)  # the emitted commands must be valid
            check_existing(root, runs, configs)
    except ConfigError as e:
        return fail(str(e))
    if args.emit:
        lines = run_commands(sweep, root, runs=runs)
        try:
            for chunk in emit(args, lines):
                print(chunk)
        except LaunchError as e:
            return fail(str(e))
        return 0
    if args.dry_run:
        for run_ in runs:
            print(f"{run_state(root / run_.name):<9} {root / run_.name}")
        return 0
    enable_compilation_cache()
    try:
        return run_sweep(sweep, root, only=args.only, out=_print, verbose=args.verbose)
    except ConfigError as e:
        return fail(str(e))
    except KeyboardInterrupt:  # between runs (during a run the trainer saves and returns)
        return fail("interrupted: rerun the same command to resume", code=130)


def _print(line: str) -> None:
    print(line, flush=True)
