"""The train step: the TrainState, its creation and the defaults a restore needs, and the pure
step functions that `perijax.train` compiles with `jax.jit` and buffer donation
(`.lower().compile()` works on them for memory planning): `update` is the step, `train_step`
and `telemetry_step` are what the trainer runs between and on log steps, `eval_step` scores.
The divergence guard and float16 loss scaling run inside the step (docs/checkpointing.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from perijax import attention as attention_lib
from perijax.config import MAX_LOSS_SCALE, Config, from_section
from perijax.model import Transformer, compute_dtype
from perijax.optim import lr_schedule, make_optimizer
from perijax.telemetry import Spikes, count_spikes, global_norm, layer_metrics


@dataclasses.dataclass(frozen=True)
class Guard:
    """Static divergence-guard settings compiled into the step (docs/checkpointing.md): the
    `train.*` keys of these names (`from_section(Guard, cfg.train)`)."""

    skip_bad_steps: bool
    skip_loss_spikes: bool  # a loss spike (Spikes) is a bad step too
    max_consecutive_bad_steps: int


@dataclasses.dataclass(frozen=True)
class LossScaling:
    """Static dynamic-loss-scaling settings of float16 compute (docs/checkpointing.md): the
    `train.*` key of this name (`from_section(LossScaling, cfg.train)`) and fixed constants. The
    scale itself and the count of finite steps since it last changed live in the TrainState."""

    loss_scale_growth_interval: int  # consecutive finite-gradient steps, then the scale grows
    backoff: ClassVar[float] = 0.5  # on an overflow, down to 1 at least
    growth: ClassVar[float] = 2.0
    max_scale: ClassVar[float] = MAX_LOSS_SCALE


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
    guard: Guard = struct.field(pytree_node=False)
    spikes: Spikes = struct.field(pytree_node=False)
    loss_scaling: LossScaling | None = struct.field(pytree_node=False, default=None)


def initial_loss_scale(cfg: Config) -> float:
    """`train.loss_scale_init` with float16 compute, else 1 (the loss is not scaled)."""
    return cfg.train.loss_scale_init if compute_dtype(cfg.model) == jnp.float16 else 1.0


def create_state(cfg: Config) -> TrainState:
    """Initializes the model from `train.seed` and the optimizer state."""
    model = Transformer(cfg.model, rngs=nnx.Rngs(params=cfg.train.seed))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg.optim, cfg.train.total_steps, cfg.model)
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
        guard=from_section(Guard, t),
        spikes=from_section(Spikes, cfg.telemetry),
        loss_scaling=(
            from_section(LossScaling, t) if compute_dtype(cfg.model) == jnp.float16 else None
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


def segment_ids(tokens: jax.Array, eod_id: int | None) -> jax.Array | None:
    """Document ids of the model inputs `tokens` [B, T] (None when masking is off)."""
    return None if eod_id is None else attention_lib.document_ids(tokens, eod_id)


def loss_fn(
    params: nnx.State, graphdef: nnx.GraphDef, tokens: jax.Array, eod_id: int | None = None
):
    """(mean next-token cross-entropy, the per-layer stream statistics of its forward pass).
    tokens: [B, T + 1] int32; `eod_id`: attend within documents only (`data.document_masking`)."""
    model = nnx.merge(graphdef, params)
    inputs = tokens[:, :-1]
    out = model.loss(inputs, tokens[:, 1:], segment_ids=segment_ids(inputs, eod_id))
    return out.total / out.count, out.stream


def loss_and_grads(state: TrainState, batch: jax.Array, eod_id: int | None = None):
    """(mean loss, gradient, per-layer stream statistics) over `batch` [A, B/A, T + 1],
    accumulated over the A micro-batches with a scan (all have the same token count, so the mean
    of the micro-batch means is the full-batch mean). The statistics are the whole batch's:
    means over micro-batches, except the maximum.

    With float16 loss scaling the loss is multiplied by `state.loss_scale` before
    differentiation, so small gradients survive float16, and the float32 gradients are divided
    by it again (a power of two: exact); an overflow shows as non-finite gradients."""
    grad_fn = (
        jax.value_and_grad(loss_fn, has_aux=True)
        if state.loss_scaling is None
        else _scaled_grad_fn(state.loss_scale)
    )
    if batch.shape[0] == 1:
        (loss, stats), grads = grad_fn(state.params, state.graphdef, batch[0], eod_id)
        return loss, _unscale(state, grads), stats

    def accumulate(carry, micro_batch):
        (loss, stats), grads = grad_fn(state.params, state.graphdef, micro_batch, eod_id)
        return jax.tree.map(jnp.add, carry, (loss, grads)), stats

    zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
    (loss, grads), stats = jax.lax.scan(accumulate, zeros, batch)
    loss, grads = jax.tree.map(lambda x: x / batch.shape[0], (loss, _unscale(state, grads)))
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


def _update_loss_scale(
    state: TrainState, amp: LossScaling, overflow: jax.Array, finite_grads: jax.Array
) -> dict[str, jax.Array]:
    """The next scale: x backoff after an overflow (not below 1), x growth (up to max_scale)
    after loss_scale_growth_interval consecutive steps with finite gradients, else unchanged."""
    good = jnp.where(finite_grads, state.scale_good_steps + 1, 0)
    grow = good >= amp.loss_scale_growth_interval
    scale = state.loss_scale
    scale = jnp.where(grow, jnp.minimum(scale * amp.growth, amp.max_scale), scale)
    scale = jnp.where(overflow, jnp.maximum(scale * amp.backoff, 1.0), scale)
    return {
        "loss_scale": scale,
        "scale_good_steps": jnp.where(grow, 0, good),
        "overflow_steps": state.overflow_steps + overflow,
    }


class Observed(NamedTuple):
    """What one update computed that only the telemetry reads: the gradient and the per-layer
    stream statistics the forward pass sowed."""

    grads: Any
    stream: dict[str, dict[str, jax.Array]]


def update(
    state: TrainState, batch: jax.Array, eod_id: int | None = None
) -> tuple[TrainState, dict[str, jax.Array], Observed]:
    """One optimizer update from the global batch laid out [B/A, A, T + 1]: micro-batch a is
    `batch[:, a]`. Axis 0 is the sharded batch axis, so every device holds rows of every
    micro-batch and each process feeds its own contiguous block of rows. Returns the new state,
    the step's metrics and what the telemetry reads (`train_step` and `telemetry_step` are this
    function with and without the last). `eod_id` (static): document masking at that
    end-of-document token (`document_eod`).
    """
    loss, grads, stream = loss_and_grads(state, batch.swapaxes(0, 1), eod_id)
    grad_norm = global_norm(grads)
    updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # Divergence guard: a bad step leaves params and optimizer state exactly as they were.
    g, amp = state.guard, state.loss_scaling
    spike_counts = count_spikes(state, loss, grad_norm)
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
    return new_state, metrics, Observed(grads, stream)


def train_step(
    state: TrainState, batch: jax.Array, eod_id: int | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`update` for the steps between log steps: what only the telemetry reads is not returned,
    so under `jax.jit` XLA removes its computation (the sown statistics) and these steps pay
    nothing for telemetry (tests/test_telemetry.py checks the compiled program)."""
    new_state, metrics, _ = update(state, batch, eod_id)
    return new_state, metrics


def telemetry_step(
    state: TrainState, batch: jax.Array, eod_id: int | None = None
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`update` with the per-layer stability metrics (`telemetry.layer_metrics`) added; the
    trainer runs it on log steps when `telemetry.enabled`."""
    new_state, metrics, observed = update(state, batch, eod_id)
    extra = layer_metrics(state, observed.grads, new_state.params, observed.stream)
    return new_state, {**metrics, **extra}


def eval_sums(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    tokens: jax.Array,
    mask: jax.Array | None = None,
    eod_id: int | None = None,
) -> dict[str, jax.Array]:
    """Summed next-token cross-entropy (nats) and count of the targets where `mask` is True (all
    when None) of tokens [B, T + 1] int32; mask: [B, T] bool (target positions), selected away,
    not multiplied, so padding cannot leak. Summed so batches combine exactly. `eod_id`:
    document masking. The trainer's evaluation and `perijax eval` both run this."""
    model = nnx.merge(graphdef, params)
    inputs = tokens[:, :-1]
    out = model.loss(inputs, tokens[:, 1:], mask, segment_ids=segment_ids(inputs, eod_id))
    return {"loss_sum": out.total, "tokens": out.count}


def eval_step(
    state: TrainState, batch: jax.Array, eod_id: int | None = None
) -> dict[str, jax.Array]:
    """`eval_sums` of one batch [B, T + 1] with the state's parameters."""
    return eval_sums(state.graphdef, state.params, batch, eod_id=eod_id)
