"""Training: the TrainState, the pure `train_step`/`eval_step` functions and `train(cfg, workdir)`.

`train_step(state, batch) -> (state, metrics)` is a top-level pure function, compiled once with
`jax.jit` and buffer donation, so `.lower().compile()` works for memory planning. `train()` reads
top to bottom in sections: data -> init -> compile -> loop (batch, step, log, eval).
"""

from __future__ import annotations

import json
import os
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
    """The loss became NaN or infinite."""


class TrainState(struct.PyTreeNode):
    """Everything a step changes (step, params, optimizer state) plus the static pieces needed
    to apply them (model graph, optimizer, schedule)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_fn: optax.Schedule = struct.field(pytree_node=False)


def create_state(cfg: Config) -> TrainState:
    """Initializes the model from `train.seed` and the optimizer state."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, cfg.train.total_steps)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(cfg.optim, cfg.train.total_steps),
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
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "train/loss": loss,
        "train/grad_norm": global_norm(grads),
        "train/param_norm": global_norm(params),
        "train/lr": state.lr_fn(state.step),
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


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


def train(
    cfg: Config,
    workdir: str | os.PathLike,
    *,
    data: data_lib.TokenData | None = None,
    log: Callable[[str], None] = print,
    devices: list[jax.Device] | None = None,
) -> dict[str, Any]:
    """Trains `cfg` and writes WORKDIR/{config.json, metrics.jsonl, TensorBoard events}.

    `devices` (default: all) are arranged into the configured mesh.

    Returns the last logged train metrics and the last eval metrics.
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
    if process == 0:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            resolved = to_dict(cfg)
            resolved["model"]["dtype"] = jnp.dtype(compute_dtype(cfg.model)).name
            (workdir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
        except OSError as e:
            raise ConfigError(f"cannot write to workdir {workdir}: {e.strerror}") from e
    writer = MetricWriter(workdir, enabled=process == 0)

    # --- init: parameters and optimizer state are created in their shardings.
    shardings = state_shardings(cfg, mesh)
    state = init_state(cfg, mesh)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(
        f"model: {n_params:,} parameters, ln_placement={cfg.model.ln_placement}, "
        f"norm={cfg.model.norm_type}, data={data.name} ({len(data.train):,} train tokens)"
    )
    log(f"mesh: {sharding_lib.describe(mesh)} over {n_processes} process(es)")

    # --- compile: explicit shardings; donation lets XLA update the state in place.
    step_fn = compile_train_step(cfg, mesh, shardings)
    eval_fn = jax.jit(eval_step, in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 2)))
    batch_sharding = sharding_lib.batch_sharding(mesh, 3)
    global_shape = (micro_batch, accum, seq_len + 1)
    eval_sharding = sharding_lib.batch_sharding(mesh, 2)
    eval_data = [sharding_lib.replicated_batch(b, eval_sharding) for b in eval_data]

    # --- loop
    last_eval = evaluate(eval_fn, state, eval_data)
    writer.write(0, last_eval)
    log(f"eval  step 0  loss {last_eval['eval/loss']:.4f}  ppl {last_eval['eval/perplexity']:.1f}")
    last_train: dict[str, float] = {}
    t_window, steps_in_window, t_loop = time.perf_counter(), 0, None
    for step in range(1, t_cfg.total_steps + 1):
        local = np.asarray(next(batches)).reshape(local_batch // accum, accum, seq_len + 1)
        with jax.set_mesh(mesh):
            batch = sharding_lib.global_batch(local, batch_sharding, global_shape)
            state, metrics = step_fn(state, batch)
        steps_in_window += 1
        if step == 1:  # the first step includes compilation: report it, then time from here
            jax.block_until_ready(metrics)
            log(f"compiled and ran the first step in {time.perf_counter() - t_window:.1f}s")
            t_window, steps_in_window, t_loop = time.perf_counter(), 0, time.perf_counter()
        if step % t_cfg.log_every_steps == 0 or step == t_cfg.total_steps:
            last_train = {k: float(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(last_train["train/loss"]):
                writer.write(step, last_train)
                writer.close()
                raise TrainingDiverged(f"loss is {last_train['train/loss']} at step {step}")
            elapsed = time.perf_counter() - t_window
            eta = None
            if steps_in_window:
                step_time = elapsed / steps_in_window
                last_train["perf/step_time_s"] = step_time
                last_train["perf/tokens_per_sec"] = tokens_per_step / step_time
                eta = step_time * (t_cfg.total_steps - step)
            writer.write(step, last_train)
            log(progress_line(step, t_cfg.total_steps, last_train, eta))
            t_window, steps_in_window = time.perf_counter(), 0
        every = t_cfg.eval_every_steps
        if (every and step % every == 0) or step == t_cfg.total_steps:
            last_eval = evaluate(eval_fn, state, eval_data)
            writer.write(step, last_eval)
            log(
                f"eval  step {step}  loss {last_eval['eval/loss']:.4f}  "
                f"ppl {last_eval['eval/perplexity']:.1f}"
            )
            t_window, steps_in_window = time.perf_counter(), 0
    writer.close()
    total_time = time.perf_counter() - (t_loop or time.perf_counter())
    log(f"done: {t_cfg.total_steps} steps in {format_duration(total_time)}; workdir {workdir}")
    return {"train": last_train, "eval": last_eval, "state": state}
