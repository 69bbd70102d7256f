"""Training: `train(cfg, workdir)`, the loop around the pure step of perijax.step.

`train()` reads top to bottom in sections: mesh -> data -> restore or init -> workdir ->
compile -> loop. Everything a launch can get wrong (mesh, batch, data, a checkpoint that does
not match) is checked before the workdir is written; the step is compiled with `jax.jit` and
buffer donation.

The loop takes one decision per step, from `Schedule`, the one place that holds the step-number
conventions: `step` is the number of updates completed once the current one has run (the first
update of a fresh run is step 1, the last is `train.total_steps`). Before update `step` runs,
`Schedule.logs(step)` says whether it is a log step, which runs a different compiled function
(telemetry); once it has run, `Schedule.after(step, ...)` returns a frozen `Due` (log, read the
log metrics now, eval, save, stop) from the step number, the checkpointer's step and clock
schedule and the stop signals, the clock and the signals agreed by all processes (`_Agreement`).
The loop body is then: batch, step, read the last log step's metrics (`_StepLog`, one step
late), `due = schedule.after(...)`, hold this step's metrics if `due.log`, and act: roll back
(`Due.rolls_back`), eval, stop, save.

The loop's own parts (the schedule, the log-step reader, the processes' agreement, the batch
layout, the rollback) sit below `train()`, since nothing else uses them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perijax import attention as attention_lib
from perijax import data as data_lib
from perijax import distributed, renamed, storage
from perijax import lease as lease_lib
from perijax import optim as optim_lib
from perijax import sharding as sharding_lib
from perijax.checkpoint import Checkpointer, CheckpointError, resolve_restore_path
from perijax.config import Config, ConfigError, flat_dict, to_dict
from perijax.config import eval_sets as eval_sets_of
from perijax.goodput import Goodput
from perijax.metrics import (
    MetricWriter,
    check_trackers,
    expand_layers,
    format_duration,
    metric_lines,
    perplexity,
    progress_line,
)
from perijax.model import check_backend, compute_dtype
from perijax.signals import StopSignal
from perijax.step import (
    RETIRED_STATE,
    TrainState,
    added_state,
    continue_loss_scale,
    create_state,
    eval_step,
    telemetry_step,
    train_step,
)
from perijax.tuning import compiler_options

# Renamed: `evaluate` shared its name with the module perijax.evaluate; `setup` returns the
# resolved config with the mesh.
__getattr__ = renamed(__name__, {"evaluate": "eval_metrics", "setup_mesh": "setup"})


class TrainingDiverged(RuntimeError):
    """Training cannot continue: non-finite loss without the guard, or repeated bad steps."""


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
    """Shardings of the whole TrainState (params and optimizer moments by the rules table)."""
    return sharding_lib.state_shardings(jax.eval_shape(lambda: create_state(cfg)), mesh)


def setup(cfg: Config, devices=None) -> tuple[Mesh, Config]:
    """The configured mesh over `devices` (default: all) and `cfg` with its batch resolved for
    it (`resolve_grad_accum`). Raises ConfigError, before any compile or write, when the mesh
    does not fit the devices or the model, or the micro-batch does not split over the mesh."""
    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    sharding_lib.check_model_fits_mesh(cfg.model, tuple(mesh.shape.values()))
    return mesh, resolve_grad_accum(cfg, mesh)


def resolve_grad_accum(cfg: Config, mesh: Mesh) -> Config:
    """`cfg` with `train.grad_accum_steps=0` (automatic) made concrete for `mesh`
    (`sharding.grad_accum_for`); checks that the micro-batch splits over the mesh."""
    t = cfg.train
    shape = tuple(mesh.shape.values())
    accum = sharding_lib.grad_accum_for(
        t.global_batch_size, t.grad_accum_steps, cfg.data.seq_len, shape
    )
    return dataclasses.replace(cfg, train=dataclasses.replace(t, grad_accum_steps=accum))


def init_state(cfg: Config, mesh: Mesh) -> TrainState:
    """Initializes the TrainState directly into its shardings (nothing is built whole on one
    device first)."""
    with jax.set_mesh(mesh):
        return jax.jit(lambda: create_state(cfg), out_shardings=state_shardings(cfg, mesh))()


def compile_train_step(
    cfg: Config,
    mesh: Mesh,
    shardings: TrainState | None = None,
    telemetry_on: bool = False,
    eod_id: int | None = None,
):
    """`train_step` (with `telemetry_on`, `telemetry_step`) jitted with explicit in/out
    shardings and the state donated; `eod_id`: the end-of-document token when
    `data.document_masking` is on (`document_eod`)."""
    shardings = shardings or state_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(telemetry_step if telemetry_on else train_step, eod_id=eod_id),
        in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 3)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
        compiler_options=compiler_options(),
    )


def document_eod(cfg: Config, data: data_lib.Datasets) -> int | None:
    """The end-of-document id that `data.document_masking` splits packed rows at (None: off)."""
    if not cfg.data.document_masking:
        return None
    if data.eod_id is None:
        raise ConfigError(
            f"data.document_masking=true needs documents that end with an end-of-document "
            f"token, but data '{data.name}' has none: prepare it with one or turn masking off"
        )
    return data.eod_id


def eval_metrics(
    eval_fn: Callable, state: TrainState, batches: list[jax.Array]
) -> dict[str, float]:
    """The eval loss and perplexity of `state`, averaged over the tokens of `batches`."""
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        with jax.set_mesh(batch.sharding.mesh):
            out = jax.device_get(eval_fn(state, batch))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / tokens
    return {"eval/loss": loss, "eval/perplexity": perplexity(loss)}


def _open_source(cfg: Config, source: str, path: str, log) -> data_lib.Datasets:
    """open_datasets(source, path) with the run's data settings."""
    return data_lib.open_datasets(
        source,
        path=path,
        vocab_size=cfg.model.vocab_size,
        seed=cfg.train.seed,
        cache_dir=cfg.data.cache_dir or None,
        remote=cfg.data.remote,
        val_fraction=cfg.data.val_fraction,
        log=log,
    )


def load_data(cfg: Config, log: Callable[[str], None] = print) -> data_lib.Datasets:
    """Opens (preparing on first use) the configured data and checks it against the model."""
    try:
        data = _open_source(cfg, cfg.data.source, cfg.data.path, log)
    except ValueError as e:  # bad data settings are config errors: one line, nothing written
        raise ConfigError(f"data.source={cfg.data.source!r}: {e}") from e
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data '{data.name}' has {data.vocab_size} token ids but model.vocab_size="
            f"{cfg.model.vocab_size}: set model.vocab_size >= {data.vocab_size}"
        )
    return data


def abstract_state(cfg: Config, mesh: Mesh) -> TrainState:
    """The TrainState as ShapeDtypeStructs carrying their target shardings (for restore)."""
    abstract = jax.eval_shape(lambda: create_state(cfg))
    shardings = state_shardings(cfg, mesh)
    return jax.tree.map(
        lambda s, sub: jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), sub
        ),
        shardings,
        abstract,
    )


def _restore_or_init(cfg: Config, mesh: Mesh, own: Any, log) -> tuple:
    """Precedence: checkpoint.restore (an explicit path) > latest in the workdir's checkpoints
    folder `own` > fresh init. Only reads: a launch refused here (a checkpoint that does not
    match the config) has changed nothing. A checkpoint of `own` that cannot be read or fails
    its checksums is named in one line and the next older one is tried (an explicit
    checkpoint.restore is not: it is an error). Returns (state, data_state or None, source,
    the steps of `own` found bad)."""
    has_own = own.is_dir() and any(c.name.isdigit() for c in own.iterdir())
    if cfg.checkpoint.restore:
        directory, step = resolve_restore_path(cfg.checkpoint.restore)
        how = "restored {} (checkpoint.restore)"
    elif has_own:
        directory, step, how = own, None, "resumed from {}"
    elif cfg.checkpoint.branch_from:
        directory, step = branch_source(cfg.checkpoint.branch_from)
        how = "branched from {} (checkpoint.branch_from)"
    else:
        return init_state(cfg, mesh), None, "initialized from train.seed", []
    source = Checkpointer(directory, cfg.checkpoint, read_only=True)
    bad: list[int] = []
    try:
        candidates = [step] if step is not None else source.steps()
        for candidate in candidates:
            failed, why = None, ""
            try:
                state, data_state = _restore(cfg, mesh, source, candidate)
            except CheckpointError as e:
                if step is not None or directory != own:  # not the run's own: no fallback
                    raise
                failed, why = e, str(e)
            # Every process must fall back alike: a shard may be bad on one process only.
            if distributed.finish_agreement(distributed.start_agreement(bool(failed), False))[0]:
                bad.append(candidate)
                log(f"note: {why or 'another process could not read checkpoint ' + str(candidate)}"
                    "; trying the previous checkpoint")  # fmt: skip
                continue
            return state, data_state, how.format(directory / str(candidate)), bad
        if bad:
            raise CheckpointError(
                f"no checkpoint in {directory} can be restored ({len(bad)} tried, all bad); "
                "they are kept as they are: remove them or restore another with --restore"
            )
        # Only incomplete steps there (a run killed during its first save).
        return init_state(cfg, mesh), None, "initialized from train.seed", []
    finally:
        source.manager.close()


def _record_branch(workdir: Any, spec: str, source: str, step: int) -> None:
    """WORKDIR/branch.json: which run and checkpoint this run started from (its first launch;
    relaunches resume the branch's own checkpoints)."""
    record = {
        "branch_from": spec,
        "checkpoint": source.removeprefix("branched from ").split(" (")[0],
        "step": step,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (workdir / "branch.json").write_text(json.dumps(record, indent=1) + "\n")


def branch_source(spec: str) -> tuple[Any, int | None]:
    """checkpoint.branch_from "RUN[@STEP]" -> (RUN's checkpoints folder, STEP or None for the
    latest); ConfigError in one line when there is no such run or step."""
    run, at, step = spec.rpartition("@")
    if not at:
        run, step = spec, ""
    folder = storage.as_path(run) / "checkpoints"
    steps = sorted(int(c.name) for c in folder.iterdir() if c.name.isdigit()) if (
        folder.is_dir()) else []  # fmt: skip
    if not steps:
        raise ConfigError(
            f"checkpoint.branch_from={spec!r}: no checkpoints in {folder} (give the workdir of "
            "a run that has saved)"
        )
    if step and int(step) not in steps:
        raise ConfigError(
            f"checkpoint.branch_from={spec!r}: {run} has no checkpoint at step {step} (it has "
            f"{', '.join(map(str, steps[-8:]))})"
        )
    return folder, int(step) if step else None


def _set_aside(own: Any, bad: list[int], log) -> None:
    """Moves the bad checkpoints of `own` out of the way (CHECKPOINTS/../checkpoints_bad/STEP):
    kept, never deleted, and not in the way of the next save of their step."""
    for step in bad:
        target = own.parent / "checkpoints_bad" / str(step)
        if target.exists():
            target = own.parent / "checkpoints_bad" / f"{step}-{int(time.time())}"
        storage.move(own / str(step), target)
        log(f"note: checkpoint {step} moved to {target}, kept for inspection")


def _restore(cfg: Config, mesh: Mesh, source: Checkpointer, step: int) -> tuple:
    """Checkpoint `step` of `source` read into the shardings of `cfg`'s state (parameters the
    config added get their defaults, retired ones are dropped), its loss scale continued
    (`continue_loss_scale`). Returns (state, data_state or None)."""
    state, data_state, meta = source.restore(
        step, abstract_state(cfg, mesh), added_state(cfg), RETIRED_STATE
    )
    return continue_loss_scale(cfg, state, meta), data_state


def _last_logged_step(workdir: Any) -> int:
    steps = [0]
    for line in metric_lines(workdir):
        try:
            steps.append(int(json.loads(line)["step"]))
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return max(steps)


def _take_lease(workdir: Any, process: int, log) -> lease_lib.Lease | None:
    """Process 0 takes WORKDIR's lease (`perijax.lease`); all processes agree on the outcome
    (one collective), so a refusal stops every one of them before anything is written."""
    held, error = None, None
    if process == 0:
        try:
            held = lease_lib.acquire(workdir, log)
        except lease_lib.LeaseError as e:
            error = e
    refused, _ = distributed.finish_agreement(distributed.start_agreement(error is not None, False))
    if refused:
        if error is not None:
            raise error
        raise lease_lib.LeaseError(f"process 0 could not take the lease of workdir {workdir}")
    return held


def record_config(workdir: Any, resolved: dict[str, Any], step: int) -> None:
    """WORKDIR/config.json is the config of the run's first launch and is never replaced. A
    later launch whose resolved config differs from the one in effect appends a line
    {"step": S, "changed": {key: [old, new]}, "config": {...}} to WORKDIR/config_history.jsonl,
    so the run's record says which settings applied from which step."""
    first, history = workdir / "config.json", workdir / "config_history.jsonl"
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        if not first.exists():
            first.write_text(json.dumps(resolved, indent=2) + "\n")
            return
        lines = history.read_text().splitlines() if history.exists() else []
        current = json.loads(lines[-1])["config"] if lines else json.loads(first.read_text())
        old, new = flat_dict(current), flat_dict(resolved)
        changed = {k: [old.get(k), new.get(k)] for k in sorted(set(old) | set(new))}
        changed = {k: v for k, v in changed.items() if v[0] != v[1]}
        if changed:
            entry = {"step": step, "changed": changed, "config": resolved}
            # Rewritten whole: object storage has no append (the file stays small).
            history.write_text("".join(f"{line}\n" for line in lines) + json.dumps(entry) + "\n")
    except OSError as e:
        raise ConfigError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e
    except ValueError as e:
        raise ConfigError(f"{first} or {history} is not valid JSON ({e})") from e


def train(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    data: data_lib.Datasets | None = None,
    log: Callable[[str], None] = print,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint if there is one.

    Writes WORKDIR/{config.json, config_history.jsonl, metrics.jsonl, TensorBoard events,
    checkpoints/}, only once the launch is known to be valid; WORKDIR may be a URL
    (`gs://...`, perijax/storage.py). `devices`
    (default: all) are arranged into the configured mesh. Returns the last logged train
    metrics, the last eval metrics, the final state and whether the run was preempted.
    """
    goodput = Goodput()  # where this launch's wall time goes (perijax/goodput.py)
    process, n_processes = jax.process_index(), jax.process_count()
    if process != 0:  # only process 0 talks and writes
        log = lambda _: None  # noqa: E731

    # --- mesh: shapes are checked against the devices, the model and the batch first.
    check_backend(cfg.model)
    check_trackers(cfg.train)
    mesh, cfg = setup(cfg, devices)
    t_cfg = cfg.train
    layout = _BatchLayout.of(cfg, n_processes)
    seq_len, accum = layout.seq_len, layout.accum

    # --- data: each process reads only its own rows; validated before anything is written.
    data = data or load_data(cfg, log)
    batches, eval_data = _open_batches(cfg, data, layout, process, n_processes)
    eval_sets = _open_eval_sets(cfg, data, layout, log)
    eod_id = document_eod(cfg, data)

    # --- restore or init: parameters and optimizer state are created in their shardings.
    workdir = storage.as_path(workdir)
    with goodput.timed("restore"):
        state, data_state, source, bad = _restore_or_init(cfg, mesh, workdir / "checkpoints", log)
    if data_state is not None:
        try:
            batches.set_state(data_state)
        except ValueError as e:  # e.g. a branch with another data.seq_len or dataset
            raise ConfigError(f"cannot continue the data stream of {source}: {e}") from e

    # --- lease: one trainer per workdir (perijax/lease.py); process 0 holds it, and every
    # process learns whether it got it before anything is written.
    lease = _take_lease(workdir, process, log)
    ckpt = writer = None
    try:
        if process == 0 and bad:
            _set_aside(workdir / "checkpoints", bad, log)
        # --- workdir: written only now that the launch is known to be valid.
        resolved = to_dict(cfg)
        resolved["model"]["dtype"] = jnp.dtype(compute_dtype(cfg.model)).name
        if process == 0:
            record_config(workdir, resolved, int(state.step))
            if source.startswith("branched from"):
                _record_branch(workdir, cfg.checkpoint.branch_from, source, int(state.step))
        ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
        start_step = int(state.step)
        # The last step an earlier launch logged: past the restored one, it was done and lost.
        previous_last_step = _last_logged_step(workdir) if process == 0 else start_step
        writer = MetricWriter(workdir, enabled=process == 0, config=resolved)
        _log_setup(cfg, state, data, mesh, f"{n_processes} process(es); {source}", eod_id, log)

        # --- compile: explicit shardings; donation lets XLA update the state in place.
        step_fn, log_step_fn, eval_fn = _compile_steps(cfg, mesh, eod_id)
        batch_sharding = sharding_lib.batch_sharding(mesh, 3)
        global_shape = (layout.micro_batch, accum, seq_len + 1)
        eval_sharding = sharding_lib.batch_sharding(mesh, 2)
        eval_data = [sharding_lib.replicated_batch(b, eval_sharding) for b in eval_data]
        eval_sets = [
            (name, [sharding_lib.replicated_batch(b, eval_sharding) for b in set_batches])
            for name, set_batches in eval_sets
        ]

        def save(step: int) -> None:
            writer.write(step, goodput.metrics())
            with goodput.timed("checkpoint"):
                ckpt.save(step, state, batches.get_state(), {"config": resolved})
            writer.flush()  # metrics up to a checkpoint survive a kill (object storage)

        def run_eval(step: int) -> dict[str, float]:
            with goodput.timed("eval"):
                metrics = eval_metrics(eval_fn, state, eval_data)
                extra = ""
                for name, set_batches in eval_sets:
                    one = eval_metrics(eval_fn, state, set_batches)
                    metrics[f"eval/{name}/loss"] = one["eval/loss"]
                    metrics[f"eval/{name}/perplexity"] = one["eval/perplexity"]
                    extra += f"  {name} {one['eval/loss']:.4f}"
            writer.write(step, metrics)
            loss, ppl = metrics["eval/loss"], metrics["eval/perplexity"]
            log(f"eval  step {step}  loss {loss:.4f}  ppl {ppl:.1f}{extra}")
            return metrics

        # --- loop: one decision per step (`Schedule.after`), then acted on.
        last_eval = run_eval(0) if start_step == 0 else {}
        step_log = _StepLog(t_cfg, layout.tokens_per_step, writer, log, start_step)
        schedule = Schedule(t_cfg, ckpt, n_processes)
        rollbacks, preempted = 0, False
        step = start_step
        goodput.redone_steps = max(0, previous_last_step - start_step)
        t_start, t_loop = time.perf_counter(), None
        with StopSignal() as stop:
            while step < t_cfg.total_steps:
                t_iteration, nested = time.perf_counter(), goodput.nested()
                step += 1  # the update this iteration runs (Schedule's convention)
                with goodput.timed("data"):
                    local = next(batches)
                local = np.asarray(local).reshape(layout.local_rows, accum, seq_len + 1)
                run_step = log_step_fn if schedule.logs(step) else step_fn
                with jax.set_mesh(mesh):
                    batch = sharding_lib.global_batch(local, batch_sharding, global_shape)
                    with jax.transfer_guard("disallow"):  # nothing implicit crosses host<->device
                        state, metrics = run_step(state, batch)
                first = t_loop is None
                if first:  # the first step includes compilation: report it separately
                    jax.block_until_ready(metrics)
                    log(f"compiled and ran the first step in {time.perf_counter() - t_start:.1f}s")
                    t_loop = time.perf_counter()
                    step_log.restart(step)
                    goodput.step_done(t_loop - t_iteration - (goodput.nested() - nested), True)
                    t_iteration, nested = t_loop, goodput.nested()
                # The last log step's metrics, one step late (this update is already queued). Read
                # before the decision: it sees what arrived while the host waited (a stop signal).
                guard_asked = step_log.read(rollbacks)
                due = schedule.after(step, stop_requested=stop.received is not None)
                guard_asked |= step_log.hold(due, metrics, rollbacks)
                if due.rolls_back(guard_asked, state):
                    rolled_from = step
                    with goodput.timed("checkpoint"):  # reading the checkpoint back
                        state, step = _roll_back(cfg, mesh, ckpt, batches, step, rollbacks, log)
                    goodput.rolled_back_steps += rolled_from - step
                    goodput.step_done(
                        time.perf_counter() - t_iteration - (goodput.nested() - nested), first
                    )
                    rollbacks += 1
                    writer.write(step, {"guard/rollbacks": rollbacks})
                    step_log.restart(step)  # drops the metrics of the steps rolled back
                    continue
                if due.eval:
                    last_eval = run_eval(step)
                    step_log.restart(step)
                if lease is not None and lease.lost and (due.save or due.stop):
                    raise lease_lib.LeaseError(f"stopped without saving: {lease.lost}")
                if due.stop:
                    save(step)
                    ckpt.wait()
                    preempted = True
                    why = (
                        f"signal {stop.received}"
                        if stop.received
                        else "a signal to another process"
                    )
                    log(f"stopped by {why}: checkpoint {step} saved; rerun to resume")
                    break
                if due.save:
                    save(step)
                if not first:
                    elapsed = time.perf_counter() - t_iteration
                    goodput.step_done(elapsed - (goodput.nested() - nested), False)
        with goodput.timed("checkpoint"):
            ckpt.close()
        writer.write(step, goodput.metrics())
        writer.close()
        if not preempted:
            total_time = time.perf_counter() - (t_loop or time.perf_counter())
            log(f"done: step {step} in {format_duration(total_time)}; workdir {workdir}")
        log(goodput.summary())
        return {"train": step_log.last, "eval": last_eval, "state": state, "preempted": preempted}
    except BaseException:
        # Stopped by an error (data gone, divergence, Ctrl-C): saves in flight finish and the
        # metrics so far are written before the error goes up; neither may mask it.
        for part in (ckpt, writer):
            if part is not None:
                with contextlib.suppress(Exception):
                    part.close()
        raise
    finally:
        if hasattr(batches, "close"):  # stops the read-ahead threads
            batches.close()
        if lease is not None:
            lease.release()


@dataclasses.dataclass(frozen=True)
class Due:
    """What the loop does once update `step` has run (`Schedule.after` decides it)."""

    step: int
    log: bool  # it ran as a log step: its metrics are held, to be written
    read_now: bool  # a log step whose metrics are read at once rather than one step late
    eval: bool
    save: bool
    stop: bool  # save, then end the loop (preempted)

    def rolls_back(self, guard_asked: bool, state: TrainState) -> bool:
        """Whether to restore the last checkpoint instead: the guard asked for it in the log
        metrics just read (`guard_asked`), or a save is due and the state's flag, sticky until
        a rollback, is set (a state that needs rolling back is never saved). Both are read only
        where the host syncs anyway."""
        return guard_asked or (self.save and bool(state.needs_rollback))


class Schedule:
    """The loop's decisions and the one statement of its step-number conventions.

    `step` is the number of updates completed once the current update has run: the first update
    of a fresh run is step 1 (step 0, before any update, is evaluated by the loop before it
    starts), the last is `train.total_steps`; a resumed run continues from its checkpoint's step.
    Update `step`

    - logs when `step % train.log_every_steps == 0` or `step == total_steps`. A log step runs
      the log-step variant of the compiled step (telemetry), so this is asked before the update
      runs (`logs`); its metrics are held and read one step late, once the next update is
      queued, so the device never waits for the host;
    - evaluates when `step % train.eval_every_steps == 0` (0: never) or `step == total_steps`;
    - saves when `Checkpointer.due_by_steps(step)` (`checkpoint.every_steps`), when
      `checkpoint.every_minutes` have passed (`Checkpointer.due_by_time`, process 0's clock
      counts) or `step == total_steps`;
    - stops (saving first) once a stop signal reached any process;
    - has its log metrics read at once (`read_now`) when it logs and also evaluates, saves,
      stops or is the last: nothing held is lost, and the host waits there anyway.

    The stop and clock flags are agreed by all processes (`_Agreement`): gathered at a step that
    logs, evaluates or saves by steps and taken at the next step, so `after` must be called once
    per update on every process. The loop calls it after reading the last log step's metrics
    (the host has waited for that step), so it sees a stop signal that arrived meanwhile.
    Rolling back is `Due.rolls_back`, given what the guard said.
    """

    def __init__(self, t_cfg: Any, ckpt: Checkpointer, n_processes: int):
        self.total, self.log_every = t_cfg.total_steps, t_cfg.log_every_steps
        self.eval_every = t_cfg.eval_every_steps
        self.ckpt = ckpt
        self.agreement = _Agreement(n_processes)

    def logs(self, step: int) -> bool:
        """Whether update `step` is a log step (asked before it runs: it picks the compiled
        step)."""
        return step % self.log_every == 0 or step == self.total

    def after(self, step: int, stop_requested: bool) -> Due:
        """What to do once update `step` has run; `stop_requested`: a stop signal reached this
        process."""
        last = step == self.total
        log = self.logs(step)
        evaluate = bool(self.eval_every and step % self.eval_every == 0) or last
        save_by_steps = self.ckpt.due_by_steps(step)
        stop, save_by_time = self.agreement.decide(
            (stop_requested, self.ckpt.due_by_time()),
            sync_now=log or evaluate or save_by_steps,
        )
        save = save_by_steps or save_by_time or last
        read_now = log and (last or save or evaluate or stop)
        return Due(step, log=log, read_now=read_now, eval=evaluate, save=save, stop=stop)


class _StepLog:
    """The metrics of log steps, read one step late. A log step's metrics are copied to the host
    asynchronously and read after the next step has been dispatched, so the device never waits
    for the host to log. Step times come from the moments those reads complete (each waits for
    its step to finish), measured from the last `restart` (the first step's compile, an eval, a
    rollback: times when the device was idle)."""

    def __init__(self, t_cfg, tokens_per_step: int, writer, log: Callable, start_step: int):
        self.t_cfg, self.tokens_per_step, self.writer, self.log = (
            t_cfg,
            tokens_per_step,
            writer,
            log,
        )
        self.pending: tuple[int, Any] | None = None  # (step, device metrics) not yet read
        self.mark: tuple[float, int] = (0.0, start_step)  # (time, step) the clock runs from
        self.last: dict[str, float] = {}  # the last metrics read

    def hold(self, due: Due, metrics: dict, rollbacks: int) -> bool:
        """Holds this update's `metrics` if it is a log step (`due.log`), to be read by the
        next update's `read`, or reads them at once when `due.read_now` (the loop evals, saves,
        stops or ends here, so nothing held is lost). Returns `read`'s rollback request, False
        when nothing was read."""
        if not due.log:
            return False
        for x in jax.tree.leaves(metrics):
            x.copy_to_host_async()
        self.pending = (due.step, metrics)
        return self.read(rollbacks) if due.read_now else False

    def restart(self, step: int) -> None:
        self.pending, self.mark = None, (time.perf_counter(), step)

    def read(self, rollbacks: int) -> bool:
        """Writes and logs the held step's metrics, if any; returns the guard's rollback
        request (its flag is sticky, so reading it only with the log metrics, where the host
        syncs anyway, misses nothing). Raises TrainingDiverged on a non-finite loss without the
        guard."""
        if self.pending is None:
            return False
        (at, device_metrics), self.pending = self.pending, None
        metrics = expand_layers(jax.device_get(device_metrics))
        now = time.perf_counter()
        rollback = bool(metrics.pop("guard/needs_rollback"))
        total = self.t_cfg.total_steps
        if not self.t_cfg.skip_bad_steps and not np.isfinite(metrics["train/loss"]):
            self.writer.write(at, metrics)
            self.writer.close()
            raise TrainingDiverged(f"loss is {metrics['train/loss']} at step {at}")
        eta = None
        if at > self.mark[1]:
            step_time = (now - self.mark[0]) / (at - self.mark[1])
            metrics["perf/step_time_s"] = step_time
            metrics["perf/tokens_per_sec"] = self.tokens_per_step / step_time
            eta = step_time * (total - at)
        self.mark = (now, at)
        metrics["guard/rollbacks"] = rollbacks
        self.writer.write(at, metrics)
        self.log(progress_line(at, total, metrics, eta))
        self.last = metrics
        return rollback


class _Agreement:
    """Stop and clock-based-save decisions that all processes take together (distributed.py):
    gathered at a step where the loop syncs anyway and read one step later, when the host waits
    for that step regardless. One process needs no agreement and decides every step."""

    def __init__(self, n_processes: int):
        self.n_processes = n_processes
        self.pending: Any = None  # flags gathered at the last sync step

    def decide(self, local_flags: tuple[bool, bool], sync_now: bool) -> tuple[bool, bool]:
        """(stop, save by the clock) for this step, from this process's `local_flags`."""
        if self.n_processes == 1:
            return local_flags
        agreed = (
            distributed.finish_agreement(self.pending)
            if self.pending is not None
            else (False, False)
        )
        self.pending = distributed.start_agreement(*local_flags) if sync_now else None
        return agreed


@dataclasses.dataclass(frozen=True)
class _BatchLayout:
    """How a global batch of `train.global_batch_size` sequences is cut: into `accum`
    micro-batches of `micro_batch` sequences, and over the processes (each holds `local_rows`
    rows of every micro-batch)."""

    seq_len: int
    accum: int
    micro_batch: int
    local_rows: int
    tokens_per_step: int

    @classmethod
    def of(cls, cfg: Config, n_processes: int) -> _BatchLayout:
        t = cfg.train
        if t.global_batch_size % n_processes:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be divisible by the "
                f"number of processes ({n_processes})"
            )
        accum = t.grad_accum_steps
        return cls(
            seq_len=cfg.data.seq_len,
            accum=accum,
            micro_batch=t.global_batch_size // accum,
            local_rows=t.global_batch_size // n_processes // accum,
            tokens_per_step=t.global_batch_size * cfg.data.seq_len,
        )


def _open_batches(
    cfg: Config, data: data_lib.Datasets, layout: _BatchLayout, process: int, n_processes: int
) -> tuple[Any, list[np.ndarray]]:
    """This process's training iterator and the eval batches; a corpus too small for the
    shapes is a ConfigError."""
    t = cfg.train
    try:
        batches = data.train_iterator(
            seq_len=layout.seq_len,
            global_batch_size=t.global_batch_size,
            seed=t.seed,
            process_index=process,
            process_count=n_processes,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        eval_data = data.eval_batches(
            seq_len=layout.seq_len, batch_size=layout.micro_batch, num_batches=t.eval_batches
        )
    except ValueError as e:  # e.g. data.seq_len longer than a tiny corpus allows
        raise ConfigError(f"data '{data.name}': {e}") from e
    return batches, eval_data


def _open_eval_sets(
    cfg: Config, data: data_lib.Datasets, layout: _BatchLayout, log
) -> list[tuple[str, list[np.ndarray]]]:
    """[(name, eval batches)] of eval.sets: each set's validation split, in the shapes of the
    main eval batches. A set tokenized otherwise than the training data, or too small, is a
    ConfigError."""
    out = []
    for name, source in eval_sets_of(cfg.eval.sets):
        kind, path = (source, "") if source in ("stdlib", "synthetic") else ("prepared", source)
        try:
            ds = _open_source(cfg, kind, path, log)
            if ds.identity != data.identity:
                raise ValueError(
                    f"it is tokenized as {ds.name} ({ds.identity.split(':')[0]}), the training "
                    f"data as {data.name} ({data.identity.split(':')[0]}): its ids would be other "
                    "tokens; prepare it with the training data's tokenizer"
                )
            batches = ds.eval_batches(
                seq_len=layout.seq_len,
                batch_size=layout.micro_batch,
                num_batches=cfg.train.eval_batches,
            )
        except ValueError as e:
            raise ConfigError(f"eval.sets: {name}={source}: {e}") from e
        out.append((name, batches))
    return out


def _log_setup(cfg, state, data, mesh: Mesh, where: str, eod_id: int | None, log) -> None:
    """The start-up lines: model, data, mesh (and where the state came from), attention."""
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(
        f"model: {n_params:,} parameters, ln_placement={cfg.model.ln_placement}, "
        f"norm={cfg.model.norm_type}, data={data.name} ({data.train_tokens:,} train tokens)"
    )
    log(f"mesh: {sharding_lib.describe(mesh)} over {where}")
    log(optim_lib.describe(cfg.optim, cfg.model))
    log(
        f"attention: {attention_lib.describe(cfg.model.attention)}"
        + ("" if eod_id is None else f", within documents (end-of-document id {eod_id})")
    )


def _compile_steps(cfg: Config, mesh: Mesh, eod_id: int | None) -> tuple[Any, Any, Any]:
    """(plain train step, log-step variant with telemetry, eval step), jitted with explicit
    shardings; one compiled step serves both train variants when telemetry is off."""
    shardings = state_shardings(cfg, mesh)
    step_fn = compile_train_step(cfg, mesh, shardings, eod_id=eod_id)
    log_step_fn = (
        compile_train_step(cfg, mesh, shardings, telemetry_on=True, eod_id=eod_id)
        if cfg.telemetry.enabled
        else step_fn
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, eod_id=eod_id),
        in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 2)),
        compiler_options=compiler_options(),
    )
    return step_fn, log_step_fn, eval_fn


def _roll_back(cfg, mesh, ckpt: Checkpointer, batches, step: int, rollbacks: int, log):
    """After max_consecutive_bad_steps: restore the last checkpoint (and, unless configured to
    skip them, replay its data), or stop with a report."""
    t = cfg.train
    report = (
        f"{t.max_consecutive_bad_steps} consecutive bad steps (non-finite or spiking loss) "
        f"up to step {step}"
    )
    ckpt.wait()
    latest = ckpt.latest_step()
    if t.on_repeated_bad_steps == "stop" or latest is None or rollbacks >= t.max_rollbacks:
        why = (
            "train.on_repeated_bad_steps=stop"
            if t.on_repeated_bad_steps == "stop"
            else "no checkpoint to roll back to"
            if latest is None
            else f"train.max_rollbacks={t.max_rollbacks} reached"
        )
        raise TrainingDiverged(f"{report}; {why}")
    state, data_state = _restore(cfg, mesh, ckpt, latest)
    if not t.rollback_skips_batches and data_state is not None:
        batches.set_state(data_state)
    log(
        f"rollback: {report}; restored checkpoint {latest}"
        + ("; continuing with new batches" if t.rollback_skips_batches else "")
    )
    return state, latest
