"""Training: the TrainState, the pure `train_step`/`eval_step` functions and `train(cfg, workdir)`.

`train_step(state, batch) -> (state, metrics)` is a top-level pure function, compiled once with
`jax.jit` and buffer donation, so `.lower().compile()` works for memory planning. `train()` reads
top to bottom in sections: data -> init -> compile -> loop (batch, step, log, eval).
"""

from __future__ import annotations

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
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from perijax import attention as attention_lib
from perijax import checkpoint as checkpoint_lib
from perijax import data as data_lib
from perijax import distributed, storage
from perijax import sharding as sharding_lib
from perijax.checkpoint import Checkpointer, resolve_restore_path
from perijax.config import MAX_LOSS_SCALE, Config, ConfigError, flat_dict, to_dict
from perijax.metrics import (
    MetricWriter,
    check_trackers,
    expand_layers,
    format_duration,
    global_norm,
    progress_line,
)
from perijax.model import Transformer, check_backend, compute_dtype
from perijax.norms import NORM_ROLES
from perijax.optim import lr_schedule, make_optimizer
from perijax.signals import StopSignal
from perijax.tuning import compiler_options


class TrainingDiverged(RuntimeError):
    """Training cannot continue: non-finite loss without the guard, or repeated bad steps."""


@dataclasses.dataclass(frozen=True)
class Guard:
    """Static divergence-guard settings compiled into the step (docs/checkpointing.md)."""

    skip_bad_steps: bool = True
    skip_loss_spikes: bool = False  # a loss spike (Spikes) is a bad step too
    max_consecutive_bad_steps: int = 5


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """Static dynamic-loss-scaling settings of float16 compute (docs/checkpointing.md). The
    scale itself and the count of finite steps since it last changed live in the TrainState."""

    growth_interval: int = 2000  # consecutive steps with finite gradients, then the scale doubles
    backoff: float = 0.5  # on an overflow, down to 1 at least
    growth: float = 2.0
    max_scale: float = MAX_LOSS_SCALE


@dataclasses.dataclass(frozen=True)
class Spikes:
    """Static spike definitions (docs/telemetry.md): the counters and, with
    `train.skip_loss_spikes`, the divergence guard use the same one."""

    grad_factor: float = 3.0
    loss_factor: float = 1.2
    window: int = 64
    min_history: int = 16


class TrainState(struct.PyTreeNode):
    """Everything a step changes (step, params, optimizer state, divergence-guard counters)
    plus the static pieces needed to apply them (model graph, optimizer, schedule, guard)."""

    step: jax.Array
    params: nnx.State
    opt_state: optax.OptState
    bad_streak: jax.Array  # consecutive skipped steps
    skipped_steps: jax.Array  # total skipped steps
    needs_rollback: jax.Array  # bad_streak reached the limit since the last check
    grad_history: jax.Array  # [window] recent finite grad norms (NaN: empty), for spike counts
    loss_history: jax.Array  # [window] recent finite losses
    history_count: jax.Array
    grad_spikes: jax.Array
    loss_spikes: jax.Array
    # float16 loss scaling (fixed at 1 and untouched by the step for other compute dtypes)
    loss_scale: jax.Array
    scale_good_steps: jax.Array  # consecutive steps with finite gradients at this scale
    overflow_steps: jax.Array  # total steps not applied because the scaled gradients overflowed
    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)
    lr_fn: optax.Schedule = struct.field(pytree_node=False)
    guard: Guard = struct.field(pytree_node=False, default=Guard())
    spikes: Spikes = struct.field(pytree_node=False, default=Spikes())
    loss_scaling: LossScaling | None = struct.field(pytree_node=False, default=None)


def initial_loss_scale(cfg: Config) -> float:
    """`train.loss_scale_init` with float16 compute, else 1 (the loss is not scaled)."""
    return cfg.train.loss_scale_init if compute_dtype(cfg.model) == jnp.float16 else 1.0


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
        bad_streak=zero(),
        skipped_steps=zero(),
        needs_rollback=jnp.zeros((), bool),
        grad_history=jnp.full((cfg.telemetry.spike_window,), jnp.nan, jnp.float32),
        loss_history=jnp.full((cfg.telemetry.spike_window,), jnp.nan, jnp.float32),
        history_count=zero(),
        grad_spikes=zero(),
        loss_spikes=zero(),
        loss_scale=jnp.asarray(initial_loss_scale(cfg), jnp.float32),
        scale_good_steps=zero(),
        overflow_steps=zero(),
        graphdef=graphdef,
        tx=tx,
        lr_fn=lr_schedule(cfg.optim, t.total_steps),
        guard=Guard(t.skip_bad_steps, t.skip_loss_spikes, t.max_consecutive_bad_steps),
        spikes=Spikes(
            cfg.telemetry.grad_spike_factor,
            cfg.telemetry.loss_spike_factor,
            cfg.telemetry.spike_window,
            cfg.telemetry.spike_min_history,
        ),
        loss_scaling=(
            LossScaling(t.loss_scale_growth_interval)
            if compute_dtype(cfg.model) == jnp.float16
            else None
        ),
    )


# TrainState entries that checkpoints written before their removal hold; a restore drops them.
# loss_avg and accepted_steps: the guard's own running-mean spike test, replaced by the spike
# counters' definition (train.skip_loss_spikes).
RETIRED_STATE = ("loss_avg", "accepted_steps")


def added_state(cfg: Config) -> dict[str, Any]:
    """TrainState entries that checkpoints written before they existed lack, with the values a
    resume from such a checkpoint starts them at (for `Checkpointer.restore`)."""
    return {"loss_scale": initial_loss_scale(cfg), "scale_good_steps": 0, "overflow_steps": 0}


def continue_loss_scale(cfg: Config, state: TrainState, meta: dict) -> TrainState:
    """A restored state with the loss scale it continues with: the checkpoint's, unless the
    checkpoint comes from a run that did not compute in float16 (its scale is a fixed 1), where
    a float16 run starts from `train.loss_scale_init`."""
    saved_dtype = meta.get("config", {}).get("model", {}).get("dtype")
    if state.loss_scaling is None or saved_dtype == "float16":
        return state
    put = lambda value, like: jax.device_put(np.asarray(value, like.dtype), like.sharding)  # noqa: E731
    return state.replace(
        loss_scale=put(cfg.train.loss_scale_init, state.loss_scale),
        scale_good_steps=put(0, state.scale_good_steps),
    )


def state_shardings(cfg: Config, mesh: Mesh) -> TrainState:
    """Shardings of the whole TrainState (params and optimizer moments by the rules table)."""
    return sharding_lib.state_shardings(jax.eval_shape(lambda: create_state(cfg)), mesh)


def setup_mesh(cfg: Config, devices=None) -> Mesh:
    """The configured mesh, checked against the model and the batch before any compile."""
    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    shape = tuple(mesh.shape.values())
    sharding_lib.check_model_fits_mesh(cfg.model, shape)
    resolve_grad_accum(cfg, mesh)
    return mesh


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
    """`train_step` jitted with explicit in/out shardings and the state donated; `eod_id`: the
    end-of-document token when `data.document_masking` is on (`document_eod`)."""
    shardings = shardings or state_shardings(cfg, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        functools.partial(train_step, telemetry_on=telemetry_on, eod_id=eod_id),
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


def segment_ids(tokens: jax.Array, eod_id: int | None) -> jax.Array | None:
    """Document ids of the model inputs `tokens` [B, T] (None when masking is off)."""
    return None if eod_id is None else attention_lib.document_ids(tokens, eod_id)


def loss_fn(
    params: nnx.State,
    graphdef: nnx.GraphDef,
    tokens: jax.Array,
    collect: bool = False,
    eod_id: int | None = None,
):
    """(mean next-token cross-entropy, per-layer stats or None). tokens: [B, T + 1] int32;
    `eod_id`: attend within documents only (`data.document_masking`)."""
    model = nnx.merge(graphdef, params)
    inputs = tokens[:, :-1]
    out = model.loss(
        inputs, tokens[:, 1:], collect_stats=collect, segment_ids=segment_ids(inputs, eod_id)
    )
    total, count, stats = out if collect else (*out, None)
    return total / count, stats


def loss_and_grads(
    state: TrainState, batch: jax.Array, collect: bool = False, eod_id: int | None = None
):
    """Mean loss, gradient (and with `collect`, per-layer stats) over `batch` [A, B/A, T + 1],
    accumulated over the A micro-batches with a scan (all have the same token count, so the mean
    of the micro-batch means is the full-batch mean). Returns (loss, grads[, stats]).

    With float16 loss scaling the loss is multiplied by `state.loss_scale` before
    differentiation, so small gradients survive float16, and the float32 gradients are divided
    by it again (a power of two: exact); an overflow shows as non-finite gradients."""
    grad_fn = (
        jax.value_and_grad(loss_fn, has_aux=True)
        if state.loss_scaling is None
        else _scaled_grad_fn(state.loss_scale)
    )
    if batch.shape[0] == 1:
        (loss, stats), grads = grad_fn(state.params, state.graphdef, batch[0], collect, eod_id)
        grads = _unscale(state, grads)
        return (loss, grads, stats) if collect else (loss, grads)

    def accumulate(carry, micro_batch):
        (loss, stats), grads = grad_fn(state.params, state.graphdef, micro_batch, collect, eod_id)
        return jax.tree.map(jnp.add, carry, (loss, grads)), stats

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), stats = jax.lax.scan(accumulate, zeros, batch)
    loss, grads = jax.tree.map(lambda x: x / batch.shape[0], (loss, _unscale(state, grads)))
    if not collect:
        return loss, grads
    # Stats of the whole batch: means over micro-batches, except the maximum.
    combined = {
        sub: {k: (v.max(0) if k == "max_abs" else v.mean(0)) for k, v in d.items()}
        for sub, d in stats.items()
    }
    return loss, grads, combined


def _scaled_grad_fn(scale: jax.Array) -> Callable:
    """value_and_grad of `loss_fn` x `scale`, returning the unscaled loss with the (scaled)
    gradients, in the shape `jax.value_and_grad(loss_fn, has_aux=True)` returns."""

    def scaled_loss(*args):
        loss, stats = loss_fn(*args)
        return loss * scale, (loss, stats)

    grad_fn = jax.value_and_grad(scaled_loss, has_aux=True)

    def fn(*args):
        (_, (loss, stats)), grads = grad_fn(*args)
        return (loss, stats), grads

    return fn


def _unscale(state: TrainState, grads: Any) -> Any:
    """Float32 gradients (model.dtype=float16 keeps float32 parameters) divided by the scale."""
    if state.loss_scaling is None:
        return grads
    return jax.tree.map(lambda g: g / state.loss_scale, grads)


def _per_layer_norms(blocks: Any, scanned: bool, num_layers: int) -> jax.Array:
    """[L] L2 norms of each layer's part of a params-shaped tree."""
    if scanned:
        leaves = jax.tree.leaves(blocks)
        sq = sum(
            jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim))) for x in leaves
        )
        return jnp.sqrt(sq)
    return jnp.stack([global_norm(blocks[i]) for i in range(num_layers)])


def _group(path: str) -> str:
    if "norm" in path:
        return "norm"
    for group in ("attn", "mlp", "embed", "lm_head"):
        if group in path.split("."):
            return "head" if group == "lm_head" else group
    return "other"


def telemetry(state: TrainState, grads: Any, params: Any, stats: dict) -> dict[str, jax.Array]:
    """Per-layer stability metrics (docs/telemetry.md). Keys holding "{}" are [L] arrays that the
    host expands to one metric per layer (`stability/resid_var/07/attn`)."""
    model_cfg = nnx.merge(state.graphdef, state.params).cfg
    scanned, num_layers = model_cfg.scan_layers, model_cfg.num_layers
    out: dict[str, jax.Array] = {}
    for sub, values in stats.items():
        for name, value in values.items():
            out[f"stability/{name}/{{}}/{sub}"] = value
    out["stability/max_abs"] = jnp.max(jnp.stack([v["max_abs"].max() for v in stats.values()]))
    out["stability/grad_norm/{}"] = _per_layer_norms(grads["blocks"], scanned, num_layers)
    old_norm = _per_layer_norms(state.params["blocks"], scanned, num_layers)
    delta = jax.tree.map(jnp.subtract, params["blocks"], state.params["blocks"])
    out["stability/update_ratio/{}"] = _per_layer_norms(delta, scanned, num_layers) / old_norm
    groups: dict[str, list] = {}
    for key, leaf in checkpoint_lib.flatten(grads).items():
        groups.setdefault(_group(key), []).append(jnp.sum(jnp.square(leaf.astype(jnp.float32))))
    for group, squares in groups.items():
        out[f"stability/grad_norm_group/{group}"] = jnp.sqrt(sum(squares))
    if model_cfg.learnable_norm_scale:
        for sub in ("attn", "mlp"):
            for role in NORM_ROLES[model_cfg.ln_placement]:
                key = f"{sub}_{role}_norm"
                if scanned:
                    gamma = jnp.mean(params["blocks"][key]["scale"][...], axis=1)
                else:
                    gamma = jnp.stack(
                        [
                            jnp.mean(params["blocks"][i][key]["scale"][...])
                            for i in range(num_layers)
                        ]
                    )
                out[f"stability/gamma/{{}}/{sub}_{role}"] = gamma
    return out


def _count_spikes(state: TrainState, loss: jax.Array, grad_norm: jax.Array) -> dict:
    """Spike counters, updated every step: a value above factor x the running median of the last
    `window` finite values (counted once `min_history` values exist). Every finite step enters
    the history, applied or not, so a lasting change of level stops counting as spikes."""
    sp = state.spikes
    ready = state.history_count >= sp.min_history
    grad_spike = ready & (grad_norm > sp.grad_factor * jnp.nanmedian(state.grad_history))
    loss_spike = ready & (loss > sp.loss_factor * jnp.nanmedian(state.loss_history))
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    pos = state.history_count % sp.window
    keep = lambda hist, v: jnp.where(finite, hist.at[pos].set(v), hist)  # noqa: E731
    return {
        "grad_history": keep(state.grad_history, grad_norm.astype(jnp.float32)),
        "loss_history": keep(state.loss_history, loss.astype(jnp.float32)),
        "history_count": state.history_count + finite,
        "grad_spikes": state.grad_spikes + grad_spike,
        "loss_spikes": state.loss_spikes + loss_spike,
    }


def _update_loss_scale(
    state: TrainState, amp: LossScaling, overflow: jax.Array, finite_grads: jax.Array
) -> dict[str, jax.Array]:
    """The next scale: x backoff after an overflow (not below 1), x growth (up to max_scale)
    after growth_interval consecutive steps with finite gradients, else unchanged."""
    good = jnp.where(finite_grads, state.scale_good_steps + 1, 0)
    grow = good >= amp.growth_interval
    scale = state.loss_scale
    scale = jnp.where(grow, jnp.minimum(scale * amp.growth, amp.max_scale), scale)
    scale = jnp.where(overflow, jnp.maximum(scale * amp.backoff, 1.0), scale)
    return {
        "loss_scale": scale,
        "scale_good_steps": jnp.where(grow, 0, good),
        "overflow_steps": state.overflow_steps + overflow,
    }


def train_step(
    state: TrainState, batch: jax.Array, telemetry_on: bool = False, eod_id: int | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from the global batch laid out [B/A, A, T + 1]: micro-batch a is
    `batch[:, a]`. Axis 0 is the sharded batch axis, so every device holds rows of every
    micro-batch and each process feeds its own contiguous block of rows.

    `telemetry_on` (static) adds the per-layer stability metrics; the trainer compiles that
    variant separately and runs it on log steps only, so other steps pay nothing for it.
    `eod_id` (static): document masking at that end-of-document token (`document_eod`).
    """
    out = loss_and_grads(state, batch.swapaxes(0, 1), telemetry_on, eod_id)
    loss, grads = out[:2]
    grad_norm = global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # Divergence guard: a bad step leaves params and optimizer state exactly as they were.
    g, amp = state.guard, state.loss_scaling
    spike_counts = _count_spikes(state, loss, grad_norm)
    ok = jnp.asarray(True)
    if g.skip_bad_steps:
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if g.skip_loss_spikes:  # the same test that counts spikes/loss
            ok &= spike_counts["loss_spikes"] == state.loss_spikes
    applied, bad, scaling = ok, ~ok, {}
    if amp is not None:
        # float16 overflow: the forward loss is finite but the scaled gradients are not, and
        # the scale can still back off. Not applied, and not a bad step: the next step retries
        # at half the scale. Once the scale is 1 such a step is a real divergence (bad).
        overflow = jnp.isfinite(loss) & ~jnp.isfinite(grad_norm) & (state.loss_scale > 1)
        applied, bad = ok & ~overflow, ~ok & ~overflow
        scaling = _update_loss_scale(state, amp, overflow, jnp.isfinite(grad_norm))
    if g.skip_bad_steps or amp is not None:
        keep = lambda new, old: jnp.where(applied, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
    bad_streak = jnp.where(applied, 0, state.bad_streak + bad)  # an overflow leaves it as is
    new_state = state.replace(
        step=state.step + 1,
        params=params,
        opt_state=opt_state,
        bad_streak=bad_streak,
        skipped_steps=state.skipped_steps + bad,
        needs_rollback=state.needs_rollback | (bad_streak >= g.max_consecutive_bad_steps),
        **spike_counts,
        **scaling,
    )
    metrics = {
        "train/loss": loss,
        "train/grad_norm": grad_norm,
        "train/param_norm": global_norm(params),
        "train/lr": state.lr_fn(state.step),
        "guard/skipped_steps": new_state.skipped_steps,
        "guard/bad_streak": bad_streak,
        "guard/needs_rollback": new_state.needs_rollback,
        "spikes/grad_norm": new_state.grad_spikes,
        "spikes/loss": new_state.loss_spikes,
    }
    if amp is not None:
        metrics["amp/loss_scale"] = new_state.loss_scale  # the scale the next step uses
        metrics["amp/overflow_steps"] = new_state.overflow_steps
    if telemetry_on:
        metrics.update(telemetry(state, grads, params, out[2]))
    return new_state, metrics


def eval_step(
    state: TrainState, batch: jax.Array, eod_id: int | None = None
) -> dict[str, jax.Array]:
    """Summed loss and token count of one batch [B, T + 1] (summed so batches combine exactly)."""
    model = nnx.merge(state.graphdef, state.params)
    inputs = batch[:, :-1]
    total, count = model.loss(inputs, batch[:, 1:], segment_ids=segment_ids(inputs, eod_id))
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


def load_data(cfg: Config, log: Callable[[str], None] = print) -> data_lib.Datasets:
    """Opens (preparing on first use) the configured data and checks it against the model."""
    try:
        data = data_lib.open_datasets(
            cfg.data.source,
            path=cfg.data.path,
            vocab_size=cfg.model.vocab_size,
            seed=cfg.train.seed,
            cache_dir=cfg.data.cache_dir or None,
            val_fraction=cfg.data.val_fraction,
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
    match the config) has changed nothing. Returns (state, data_state or None, source)."""
    if cfg.checkpoint.restore:
        directory, step = resolve_restore_path(cfg.checkpoint.restore)
        how = "restored {} (checkpoint.restore)"
    elif own.is_dir() and any(c.name.isdigit() for c in own.iterdir()):
        directory, step, how = own, None, "resumed from {}"
    else:
        return init_state(cfg, mesh), None, "initialized from train.seed"
    source = Checkpointer(directory, cfg.checkpoint, read_only=True)
    try:
        step = step if step is not None else source.latest_step()
        if step is None:  # only incomplete steps there (a run killed during its first save)
            return init_state(cfg, mesh), None, "initialized from train.seed"
        state, data_state, meta = source.restore(
            step, abstract_state(cfg, mesh), added_state(cfg), RETIRED_STATE
        )
        state = continue_loss_scale(cfg, state, meta)
    finally:
        source.manager.close()
    return state, data_state, how.format(directory / str(step))


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
    process, n_processes = jax.process_index(), jax.process_count()
    if process != 0:  # only process 0 talks and writes
        log = lambda _: None  # noqa: E731

    # --- mesh: shapes are checked against the devices, the model and the batch first.
    check_backend(cfg.model)
    check_trackers(cfg.train)
    mesh = setup_mesh(cfg, devices)
    cfg = resolve_grad_accum(cfg, mesh)
    t_cfg = cfg.train
    seq_len, accum = cfg.data.seq_len, t_cfg.grad_accum_steps
    micro_batch = t_cfg.global_batch_size // accum
    tokens_per_step = t_cfg.global_batch_size * seq_len
    if t_cfg.global_batch_size % n_processes:
        raise ConfigError(
            f"train.global_batch_size={t_cfg.global_batch_size} must be divisible by the "
            f"number of processes ({n_processes})"
        )
    local_batch = t_cfg.global_batch_size // n_processes

    # --- data: each process reads only its own rows; validated before anything is written.
    data = data or load_data(cfg, log)
    try:
        batches = data.train_iterator(
            seq_len=seq_len,
            global_batch_size=t_cfg.global_batch_size,
            seed=t_cfg.seed,
            process_index=process,
            process_count=n_processes,
            num_threads=cfg.data.num_threads,
            prefetch=cfg.data.prefetch,
        )
        eval_data = data.eval_batches(
            seq_len=seq_len, batch_size=micro_batch, num_batches=t_cfg.eval_batches
        )
    except ValueError as e:  # e.g. data.seq_len longer than a tiny corpus allows
        raise ConfigError(f"data '{data.name}': {e}") from e
    eod_id = document_eod(cfg, data)

    # --- restore or init: parameters and optimizer state are created in their shardings.
    workdir = storage.as_path(workdir)
    state, data_state, source = _restore_or_init(cfg, mesh, workdir / "checkpoints", log)
    if data_state is not None:
        batches.set_state(data_state)

    # --- workdir: written only now that the launch is known to be valid.
    resolved = to_dict(cfg)
    resolved["model"]["dtype"] = jnp.dtype(compute_dtype(cfg.model)).name
    if process == 0:
        record_config(workdir, resolved, int(state.step))
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    start_step = int(state.step)
    writer = MetricWriter(workdir, enabled=process == 0, config=resolved)
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    log(
        f"model: {n_params:,} parameters, ln_placement={cfg.model.ln_placement}, "
        f"norm={cfg.model.norm_type}, data={data.name} ({data.train_tokens:,} train tokens)"
    )
    log(f"mesh: {sharding_lib.describe(mesh)} over {n_processes} process(es); {source}")
    log(
        f"attention: {attention_lib.describe(cfg.model.attention)}"
        + ("" if eod_id is None else f", within documents (end-of-document id {eod_id})")
    )

    # --- compile: explicit shardings; donation lets XLA update the state in place.
    shardings = state_shardings(cfg, mesh)
    step_fn = compile_train_step(cfg, mesh, shardings, eod_id=eod_id)
    log_step_fn = (  # one compiled step serves both when telemetry is off
        compile_train_step(cfg, mesh, shardings, telemetry_on=True, eod_id=eod_id)
        if cfg.telemetry.enabled
        else step_fn
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, eod_id=eod_id),
        in_shardings=(shardings, sharding_lib.batch_sharding(mesh, 2)),
        compiler_options=compiler_options(),
    )
    batch_sharding = sharding_lib.batch_sharding(mesh, 3)
    global_shape = (micro_batch, accum, seq_len + 1)
    eval_sharding = sharding_lib.batch_sharding(mesh, 2)
    eval_data = [sharding_lib.replicated_batch(b, eval_sharding) for b in eval_data]

    def save(step: int) -> None:
        ckpt.save(step, state, batches.get_state(), {"config": resolved})
        writer.flush()  # metrics up to a checkpoint survive a kill (object storage)

    def run_eval(step: int) -> dict[str, float]:
        metrics = evaluate(eval_fn, state, eval_data)
        writer.write(step, metrics)
        loss, ppl = metrics["eval/loss"], metrics["eval/perplexity"]
        log(f"eval  step {step}  loss {loss:.4f}  ppl {ppl:.1f}")
        return metrics

    # --- loop
    # Metrics of a log step are copied to the host asynchronously and read after the next step
    # has been dispatched, so the device never waits for the host to log. Step times come from
    # the moments those reads complete (each waits for its step to finish).
    last_eval = run_eval(0) if start_step == 0 else {}
    last_train: dict[str, float] = {}
    rollbacks, preempted = 0, False
    pending: tuple[int, Any] | None = None  # (step, device metrics) of a log step not yet read
    agreement: Any = None  # flags gathered at the last sync step, read at the next step
    mark: tuple[float, int] = (0.0, start_step)  # (time, step) when the device last went idle

    def read_metrics() -> bool:
        """Logs the pending log step's metrics; returns the guard's rollback request."""
        nonlocal pending, last_train, mark
        at, device_metrics = pending
        pending = None
        last_train = expand_layers(jax.device_get(device_metrics))
        now = time.perf_counter()
        rollback = bool(last_train.pop("guard/needs_rollback"))
        if not t_cfg.skip_bad_steps and not np.isfinite(last_train["train/loss"]):
            writer.write(at, last_train)
            writer.close()
            raise TrainingDiverged(f"loss is {last_train['train/loss']} at step {at}")
        eta = None
        if at > mark[1]:
            step_time = (now - mark[0]) / (at - mark[1])
            last_train["perf/step_time_s"] = step_time
            last_train["perf/tokens_per_sec"] = tokens_per_step / step_time
            eta = step_time * (t_cfg.total_steps - at)
        mark = (now, at)
        last_train["guard/rollbacks"] = rollbacks
        writer.write(at, last_train)
        log(progress_line(at, t_cfg.total_steps, last_train, eta))
        return rollback

    step = start_step
    t_start, t_loop = time.perf_counter(), None
    with StopSignal() as stop:
        while step < t_cfg.total_steps:
            local = np.asarray(next(batches)).reshape(local_batch // accum, accum, seq_len + 1)
            logs = (step + 1) % t_cfg.log_every_steps == 0 or step + 1 == t_cfg.total_steps
            with jax.set_mesh(mesh):
                batch = sharding_lib.global_batch(local, batch_sharding, global_shape)
                with jax.transfer_guard("disallow"):  # nothing implicit crosses host<->device
                    state, metrics = (log_step_fn if logs else step_fn)(state, batch)
            step += 1
            if t_loop is None:  # the first step includes compilation: report it separately
                jax.block_until_ready(metrics)
                log(f"compiled and ran the first step in {time.perf_counter() - t_start:.1f}s")
                t_loop = time.perf_counter()
                mark = (t_loop, step)
            last = step == t_cfg.total_steps
            every = t_cfg.eval_every_steps
            eval_now = bool(every and step % every == 0) or last
            # The guard's rollback flag is sticky, so it is read only where the host syncs anyway:
            # with the log-step metrics and before a checkpoint is written.
            needs_rollback = read_metrics() if pending is not None else False
            # Stop and clock-based saves are agreed by all processes (distributed.py): started at
            # a step where the loop syncs anyway, read one step later, when the host waits for
            # that step regardless. One process needs no agreement and checks every step.
            local_flags = (stop.received is not None, ckpt.due_by_time())
            if n_processes == 1:
                stop_now, time_due = local_flags
            else:
                stop_now, time_due = (
                    distributed.finish_agreement(agreement)
                    if agreement is not None
                    else (False, False)
                )
                agreement = None
                if logs or eval_now or ckpt.due_by_steps(step):
                    agreement = distributed.start_agreement(*local_flags)
            save_now = ckpt.due_by_steps(step) or time_due or last
            if logs:
                for x in jax.tree.leaves(metrics):
                    x.copy_to_host_async()
                pending = (step, metrics)
                if last or save_now or eval_now or stop_now:
                    needs_rollback |= read_metrics()
            if needs_rollback or (save_now and bool(state.needs_rollback)):
                state, step = _roll_back(cfg, mesh, ckpt, batches, step, rollbacks, log)
                rollbacks += 1
                writer.write(step, {"guard/rollbacks": rollbacks})
                pending, mark = None, (time.perf_counter(), step)  # metrics of the dropped steps
                continue
            if eval_now:
                last_eval = run_eval(step)
                mark = (time.perf_counter(), step)
            if stop_now:
                save(step)
                ckpt.wait()
                preempted = True
                why = f"signal {stop.received}" if stop.received else "a signal to another process"
                log(f"stopped by {why}: checkpoint {step} saved; rerun to resume")
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
    state, data_state, meta = ckpt.restore(
        latest, abstract_state(cfg, mesh), added_state(cfg), RETIRED_STATE
    )
    state = continue_loss_scale(cfg, state, meta)
    if not t.rollback_skips_batches and data_state is not None:
        batches.set_state(data_state)
    log(
        f"rollback: {report}; restored checkpoint {latest}"
        + ("; continuing with new batches" if t.rollback_skips_batches else "")
    )
    return state, latest
