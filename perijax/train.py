"""Training: the TrainState, the pure `train_step`/`eval_step` functions and `train(cfg, workdir)`.

`train_step(state, batch) -> (state, metrics)` is a top-level pure function, compiled once with
`jax.jit` and buffer donation, so `.lower().compile()` works for memory planning. `train()` reads
top to bottom in sections: data -> init -> compile -> loop (batch, step, log, eval).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perijax import data as data_lib
from perijax import sharding as sharding_lib
from perijax.checkpoint import Checkpointer, resolve_restore_path
from perijax.config import Config, ConfigError, to_dict
from perijax.metrics import (
    MetricWriter,
    cross_entropy,
    format_duration,
    global_norm,
    progress_line,
)
from perijax.model import Transformer, check_backend, compute_dtype
from perijax.optim import lr_schedule, make_optimizer


class TrainingDiverged(RuntimeError):
    """Training cannot continue: non-finite loss without the guard, or repeated bad steps."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """Static divergence-guard settings compiled into the step (docs/checkpointing.md)."""

    skip_bad_steps: bool = True
    loss_spike_factor: float = 0.0  # 0: only non-finite steps are bad
    max_consecutive_bad_steps: int = 5
    spike_warmup_steps: int = 20  # accepted steps before the spike test starts
    spike_window: int = 100  # the recent average is a running mean over about this many steps


class TrainState(struct.PyTreeNode):
    """Everything a step changes (step, params, optimizer state, divergence-guard counters)
    plus the static pieces needed to apply them (model graph, optimizer, schedule, guard)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    loss_avg: jax.Array  # running mean of accepted losses (the spike reference)
    accepted_steps: jax.Array
    bad_streak: jax.Array  # consecutive skipped steps
    skipped_steps: jax.Array  # total skipped steps
    needs_rollback: jax.Array  # bad_streak reached the limit since the last check
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_fn: optax.Schedule = struct.field(pytree_node=False)
    guard: Guard = struct.field(pytree_node=False, default=Guard())


def create_state(cfg: Config) -> TrainState:
    """Initializes the model from `train.seed` and the optimizer state."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, cfg.train.total_steps)
    t = cfg.train
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (distinct buffers: all are donated)
    return TrainState(
        step=zero(),
        params=params,
        opt_state=tx.init(params),
        loss_avg=jnp.zeros((), jnp.float32),
        accepted_steps=zero(),
        bad_streak=zero(),
        skipped_steps=zero(),
        needs_rollback=jnp.zeros((), bool),
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(cfg.optim, t.total_steps),
        guard=Guard(t.skip_bad_steps, t.loss_spike_factor, t.max_consecutive_bad_steps),
    )


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
    """Shardings of the whole TrainState (params and optimizer moments by the rules table)."""
    return sharding_lib.state_shardings(jax.eval_shape(lambda: create_state(cfg)), mesh)


def setup_mesh(cfg: Config, devices=None) -> Mesh:
    """The configured mesh, checked against the model and the batch before any compile."""
    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    shape = tuple(mesh.shape.values())
    sharding_lib.check_model_fits_mesh(cfg.model, shape)
    sharding_lib.check_batch_fits_mesh(
        cfg.train.global_batch_size, cfg.train.grad_accum_steps, shape
    )
    return mesh


def init_state(cfg: Config, mesh: Mesh) -> TrainState:
    """Initializes the TrainState directly into its shardings (nothing is built whole on one
    device first)."""
    with jax.set_mesh(mesh):
        return jax.jit(lambda: create_state(cfg), out_shardings=state_shardings(cfg, mesh))()


def compile_train_step(cfg: Config, mesh: Mesh, shardings: TrainState | None = None):
    """`train_step` jitted with explicit in/out shardings and the state donated."""
    shardings = shardings or state_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        train_step,
        in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 3)),
        out_shardings=(shardings, replicated),
        donate_argnums=0,
    )


def loss_fn(params: nnx.State, graphdef: nnx.GraphDef, tokens: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy. tokens: [B, T + 1] int32."""
    model = nnx.merge(graphdef, params)
    logits = model(tokens[:, :-1])
    total, count = cross_entropy(logits, tokens[:, 1:])
    return total / count


def loss_and_grads(state: TrainState, batch: jax.Array) -> tuple[jax.Array, nnx.State]:
    """Mean loss and gradient over `batch` [A, B/A, T + 1], accumulated over the A micro-batches
    with a scan (all have the same token count, so the mean of the micro-batch means is the
    full-batch mean)."""
    grad_fn = jax.value_and_grad(loss_fn)
    if batch.shape[0] == 1:
        return grad_fn(state.params, state.graphdef, batch[0])

    def accumulate(carry, micro_batch):
        loss, grads = grad_fn(state.params, state.graphdef, micro_batch)
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, batch)
    return jax.tree.map(lambda x: x / batch.shape[0], (loss, grads))


def train_step(state: TrainState, batch: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from the global batch laid out [B/A, A, T + 1]: micro-batch a is
    `batch[:, a]`. Axis 0 is the sharded batch axis, so every device holds rows of every
    micro-batch and each process feeds its own contiguous block of rows."""
    loss, grads = loss_and_grads(state, batch.swapaxes(0, 1))
    grad_norm = global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # Divergence guard: a bad step leaves params and optimizer state exactly as they were.
    g = state.guard
    ok = jnp.asarray(True)
    if g.skip_bad_steps:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if g.loss_spike_factor > 0:
            warm = state.accepted_steps >= g.spike_warmup_steps
            ok &= ~(warm & (loss > g.loss_spike_factor * state.loss_avg))
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    n = jnp.minimum(state.accepted_steps + 1, g.spike_window).astype(jnp.float32)
    loss_avg = jnp.where(ok, state.loss_avg + (loss - state.loss_avg) / n, state.loss_avg)
    bad_streak = jnp.where(ok, 0, state.bad_streak + 1)
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        loss_avg=loss_avg,
        accepted_steps=state.accepted_steps + ok,
        bad_streak=bad_streak,
        skipped_steps=state.skipped_steps + (~ok),
        needs_rollback=state.needs_rollback | (bad_streak >= g.max_consecutive_bad_steps),
    )
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/param_norm": global_norm(params),
        "train/lr": state.lr_fn(state.step),
        "guard/skipped_steps": new_state.skipped_steps,
        "guard/bad_streak": bad_streak,
        "guard/needs_rollback": new_state.needs_rollback,
    }
    return new_state, metrics


def eval_step(state: TrainState, batch: jax.Array) -> dict[str, jax.Array]:
    """Summed loss and token count of one batch [B, T + 1] (summed so batches combine exactly)."""
    model = nnx.merge(state.graphdef, state.params)
    total, count = cross_entropy(model(batch[:, :-1]), batch[:, 1:])
    return {"loss_sum": total, "tokens": count}


def evaluate(eval_fn: Callable, state: TrainState, batches: list[jax.Array]) -> dict[str, float]:
    loss_sum, tokens = 0.0, 0.0
    for batch in batches:
        with jax.set_mesh(batch.sharding.mesh):
            out = jax.device_get(eval_fn(state, batch))
        loss_sum += float(out["loss_sum"])
        tokens += float(out["tokens"])
    loss = loss_sum / tokens
    return {"eval/loss": loss, "eval/perplexity": float(np.exp(min(loss, 80.0)))}


def load_data(cfg: Config, log: Callable[[str], None] = print) -> data_lib.TokenData:
    """Loads (preparing on first use) the configured tokens and checks them against the model."""
    try:
        data = data_lib.load_token_data(
            cfg.data.source,
            cfg.model.vocab_size,
            cache_dir=cfg.data.cache_dir or None,
            val_fraction=cfg.data.val_fraction,
            seed=cfg.train.seed,
            log=log,
        )
    except ValueError as e:  # bad data settings are config errors: one line, nothing written
        raise ConfigError(f"data.source={cfg.data.source!r}: {e}") from e
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"data '{data.name}' has {data.vocab_size} token ids but model.vocab_size="
            f"{cfg.model.vocab_size}: set model.vocab_size >= {data.vocab_size}"
        )
    return data


class StopSignal:
    """SIGTERM/SIGINT: finish the current step, checkpoint, exit 0. A second signal exits at
    once. (TPU maintenance events and SLURM's --signal deliver SIGTERM ahead of the kill.)"""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> StopSignal:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def agreed(self) -> bool:
        """Whether any process was signalled; every process calls this at the same step, so all
        of them stop (and save) together."""
        stop = self.received is not None
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            stop = bool(np.any(multihost_utils.process_allgather(np.asarray(stop))))
        return stop


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


def _restore_or_init(cfg: Config, mesh: Mesh, ckpt: Checkpointer, log) -> tuple:
    """Precedence: checkpoint.restore (an explicit path) > latest in the workdir > fresh init.
    Returns (state, data_state or None, source description)."""
    if cfg.checkpoint.restore:
        directory, step = resolve_restore_path(cfg.checkpoint.restore)
        source = Checkpointer(directory, cfg.checkpoint, read_only=True)
        step = step if step is not None else source.latest_step()
        state, data_state, _ = source.restore(step, abstract_state(cfg, mesh))
        return state, data_state, f"restored {directory / str(step)} (checkpoint.restore)"
    if ckpt.latest_step() is not None:
        step = ckpt.latest_step()
        state, data_state, _ = ckpt.restore(step, abstract_state(cfg, mesh))
        return state, data_state, f"resumed from {ckpt.directory / str(step)}"
    return init_state(cfg, mesh), None, "initialized from train.seed"


def train(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    data: data_lib.TokenData | None = None,
    log: Callable[[str], None] = print,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains `cfg` in `workdir`, resuming from its latest checkpoint if there is one.

    Writes WORKDIR/{config.json, metrics.jsonl, TensorBoard events, checkpoints/}. `devices`
    (default: all) are arranged into the configured mesh. Returns the last logged train
    metrics, the last eval metrics, the final state and whether the run was preempted.
    """
    t_cfg = cfg.train
    seq_len, accum = cfg.data.seq_len, t_cfg.grad_accum_steps
    micro_batch = t_cfg.global_batch_size // accum
    tokens_per_step = t_cfg.global_batch_size * seq_len
    process, n_processes = jax.process_index(), jax.process_count()
    if process != 0:  # only process 0 talks and writes
        log = lambda _: None  # noqa: E731

    # --- mesh: shapes are checked against the devices, the model and the batch first.
    check_backend(cfg.model)
    mesh = setup_mesh(cfg, devices)
    if t_cfg.global_batch_size % n_processes:
        raise ConfigError(
            f"train.global_batch_size={t_cfg.global_batch_size} must be divisible by the "
            f"number of processes ({n_processes})"
        )
    local_batch = t_cfg.global_batch_size // n_processes

    # --- data: each process reads only its own rows; validated before anything is written.
    data = data or load_data(cfg, log)
    try:
        batches = data_lib.train_batches(
            data.train,
            seq_len=seq_len,
            batch_size=local_batch,
            seed=t_cfg.seed,
            process_index=process,
            process_count=n_processes,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        eval_data = data_lib.eval_batches(
            data.val, seq_len=seq_len, batch_size=micro_batch, num_batches=t_cfg.eval_batches
        )
    except ValueError as e:  # e.g. data.seq_len longer than a tiny corpus allows
        raise ConfigError(f"data '{data.name}': {e}") from e

    # --- workdir: the resolved config first, so a run is always identifiable.
    workdir = Path(workdir)
    resolved = to_dict(cfg)
    resolved["model"]["dtype"] = jnp.dtype(compute_dtype(cfg.model)).name
    if process == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            (workdir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write to workdir {workdir}: {e.strerror}") from e

    # --- restore or init: parameters and optimizer state are created in their shardings.
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    state, data_state, source = _restore_or_init(cfg, mesh, ckpt, log)
    if data_state is not None:
        batches.set_state(data_state)
    start_step = int(state.step)
    writer = MetricWriter(workdir, enabled=process == 0)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(
        f"model: {n_params:,} parameters, ln_placement={cfg.model.ln_placement}, "
        f"norm={cfg.model.norm_type}, data={data.name} ({len(data.train):,} train tokens)"
    )
    log(f"mesh: {sharding_lib.describe(mesh)} over {n_processes} process(es); {source}")

    # --- compile: explicit shardings; donation lets XLA update the state in place.
    shardings = state_shardings(cfg, mesh)
    step_fn = compile_train_step(cfg, mesh, shardings)
    eval_fn = jax.jit(eval_step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 2)))
    batch_sharding = sharding_lib.batch_sharding(mesh, 3)
    global_shape = (micro_batch, accum, seq_len + 1)
    eval_sharding = sharding_lib.batch_sharding(mesh, 2)
    eval_data = [sharding_lib.replicated_batch(b, eval_sharding) for b in eval_data]

    def save(step: int) -> None:
        ckpt.save(step, state, batches.get_state(), {"config": resolved})

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(eval_fn, state, eval_data)
        writer.write(step, metrics)
        loss, ppl = metrics["eval/loss"], metrics["eval/perplexity"]
        log(f"eval  step {step}  loss {loss:.4f}  ppl {ppl:.1f}")
        return metrics

    # --- loop
    last_eval = run_eval(0) if start_step == 0 else {}
    last_train: dict[str, float] = {}
    rollbacks, preempted = 0, False
    t_window, steps_in_window, t_loop = time.perf_counter(), 0, None
    step = start_step
    with StopSignal() as stop:
        while step < t_cfg.total_steps:
            local = np.asarray(next(batches)).reshape(local_batch // accum, accum, seq_len + 1)
            with jax.set_mesh(mesh):
                batch = sharding_lib.global_batch(local, batch_sharding, global_shape)
                state, metrics = step_fn(state, batch)
            step += 1
            steps_in_window += 1
            if t_loop is None:  # the first step includes compilation: report it separately
                jax.block_until_ready(metrics)
                log(f"compiled and ran the first step in {time.perf_counter() - t_window:.1f}s")
                t_window, steps_in_window, t_loop = time.perf_counter(), 0, time.perf_counter()
            last = step == t_cfg.total_steps
            # The guard's rollback flag is sticky, so it is read only where the host syncs anyway:
            # at log steps (with the metrics) and before a checkpoint is written.
            needs_rollback = False
            if step % t_cfg.log_every_steps == 0 or last:
                last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
                needs_rollback = bool(last_train.pop("guard/needs_rollback"))
                if not t_cfg.skip_bad_steps and not np.isfinite(last_train["train/loss"]):
                    writer.write(step, last_train)
                    writer.close()
                    raise TrainingDiverged(f"loss is {last_train['train/loss']} at step {step}")
                eta = None
                if steps_in_window:
                    step_time = (time.perf_counter() - t_window) / steps_in_window
                    last_train["perf/step_time_s"] = step_time
                    last_train["perf/tokens_per_sec"] = tokens_per_step / step_time
                    eta = step_time * (t_cfg.total_steps - step)
                last_train["guard/rollbacks"] = rollbacks
                writer.write(step, last_train)
                log(progress_line(step, t_cfg.total_steps, last_train, eta))
                t_window, steps_in_window = time.perf_counter(), 0
            save_now = ckpt.due(step) or last
            if needs_rollback or (save_now and bool(state.needs_rollback)):
                state, step = _roll_back(cfg, mesh, ckpt, batches, step, rollbacks, log)
                rollbacks += 1
                writer.write(step, {"guard/rollbacks": rollbacks})
                continue
            every = t_cfg.eval_every_steps
            if (every and step % every == 0) or last:
                last_eval = run_eval(step)
                t_window, steps_in_window = time.perf_counter(), 0
            if stop.agreed():
                save(step)
                ckpt.wait()
                preempted = True
                log(f"stopped by signal {stop.received}: checkpoint {step} saved; rerun to resume")
                break
            if save_now:
                save(step)
    ckpt.close()
    writer.close()
    if not preempted:
        total_time = time.perf_counter() - (t_loop or time.perf_counter())
        log(f"done: step {step} in {format_duration(total_time)}; workdir {workdir}")
    return {"train": last_train, "eval": last_eval, "state": state, "preempted": preempted}


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
    state, data_state, _ = ckpt.restore(latest, abstract_state(cfg, mesh))
    if not t.rollback_skips_batches and data_state is not None:
        batches.set_state(data_state)
    log(
        f"rollback: {report}; restored checkpoint {latest}"
        + ("; continuing with new batches" if t.rollback_skips_batches else "")
    )
    return state, latest
