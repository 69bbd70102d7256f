"""Optax optimizer: learning-rate schedules, global-norm clipping, AdamW with a weight-decay mask
chosen by parameter path (norm scales and biases are never decayed), and Muon for the hidden
matrices (`optim.name=muon`), chosen by the logical axes the parameters carry."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

from perijax.config import ModelConfig, OptimConfig, wsd_decay_steps

MUON_RMS = 0.2  # Muon updates scaled to AdamW's typical RMS (Moonlight): one lr for both groups


def _wsd(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Warmup-stable-decay: 0 -> lr over warmup_steps, lr until the decay starts, then
    lr -> lr * min_lr_ratio by `decay_shape` over the last wsd_decay_steps steps of the run.
    The stable part does not depend on total_steps, so runs of any length branched from one
    stable run share it."""
    decay = wsd_decay_steps(cfg, total_steps)
    start, warmup = total_steps - decay, max(cfg.warmup_steps, 0)
    end = cfg.lr * cfg.min_lr_ratio

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        p = jnp.clip((step - start) / decay, 0.0, 1.0)
        match cfg.decay_shape:
            case "1-sqrt":
                f = 1.0 - jnp.sqrt(p)
            case "linear":
                f = 1.0 - p
            case "cosine":
                f = 0.5 * (1.0 + jnp.cos(jnp.pi * p))
            case _:
                raise ValueError(f"unknown optim.decay_shape {cfg.decay_shape!r}")
        lr = end + (cfg.lr - end) * f
        if warmup:
            lr = jnp.where(step < warmup, cfg.lr * step / warmup, lr)
        return lr

    return schedule


@functools.cache
def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `lr` over `warmup_steps`, then cosine or linear decay to
    `lr * min_lr_ratio` at `decay_steps` (default: the run's total steps), or constant; or
    warmup-stable-decay (`wsd`)."""
    if cfg.schedule == "wsd":
        return _wsd(cfg, total_steps)
    decay_steps = cfg.decay_steps or total_steps
    warmup = max(cfg.warmup_steps, 0)
    after = max(decay_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    match cfg.schedule:
        case "cosine":
            decay = optax.cosine_decay_schedule(cfg.lr, after, alpha=cfg.min_lr_ratio)
        case "linear":
            decay = optax.linear_schedule(cfg.lr, end, after)
        case "constant":
            decay = optax.constant_schedule(cfg.lr)
        case _:
            raise ValueError(f"unknown optim.schedule {cfg.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def _path_names(path: tuple[Any, ...]) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: everything except parameters inside a norm module
    (`*_norm/scale`, `*_norm/bias`, `q_norm`, `k_norm`) and any bias."""

    def decays(path: tuple[Any, ...], _: Any) -> bool:
        names = _path_names(path)
        return not any(n.endswith("norm") or n == "bias" for n in names)

    return jax.tree_util.tree_map_with_path(decays, params)


def _key(path: tuple[Any, ...]) -> str:
    """ "blocks/attn/wq" for a parameter's path in the param tree (or in the Variable tree)."""
    return "/".join(n for n in _path_names(path) if n != "value")


@functools.cache
def muon_dimensions(model: ModelConfig) -> dict[str, MuonDimensionNumbers]:
    """{parameter path: its matrix axes} of the parameters Muon updates: those whose logical axes
    hold `embed`, no `vocab`, and at least one more axis besides a stacked `layers` axis: the
    attention projections (embed x heads x kv) and the MLP matrices (embed x mlp). The side
    holding `embed` first is the input (reduction) side; `layers` is a batch axis, so each layer
    is orthogonalized on its own. Embeddings and the head (`vocab`), norm scales and anything
    1-D stay with AdamW."""
    from flax import nnx

    from perijax.model import Transformer
    from perijax.sharding import variable_axes

    abstract = nnx.eval_shape(lambda: Transformer(model, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    out = {}
    for path, var in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_var)[0]:
        axes = variable_axes(var, len(var.get_value().shape))
        inner = [i for i, a in enumerate(axes) if a != "layers"]
        if len(inner) < 2 or "embed" not in axes or "vocab" in axes:
            continue
        embed = axes.index("embed")
        if embed == inner[0]:
            dims = MuonDimensionNumbers((embed,), tuple(inner[1:]))
        else:
            dims = MuonDimensionNumbers(tuple(i for i in inner if i != embed), (embed,))
        out[_key(path)] = dims
    return out


def _dimension_numbers(dims: dict[str, MuonDimensionNumbers]):
    """The per-leaf MuonDimensionNumbers of a (partition-masked) update tree."""
    masked = optax.MaskedNode

    def numbers(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, x: x if isinstance(x, masked) else dims[_key(p)],
            tree,
            is_leaf=lambda x: isinstance(x, masked),
        )

    return numbers


def _scale_by_shape(numbers) -> optax.GradientTransformation:
    """Orthogonalized updates (RMS 1/sqrt(max(fan_in, fan_out))) scaled by
    MUON_RMS * sqrt(max(fan_in, fan_out)), so their RMS is AdamW's (Moonlight, arXiv 2502.16982)."""

    def scale(u: Any, d: MuonDimensionNumbers) -> Any:
        if isinstance(u, optax.MaskedNode):
            return u
        axes = lambda a: (a,) if isinstance(a, int) else tuple(a)  # noqa: E731
        fan_in = math.prod(u.shape[i] for i in axes(d.reduction_axis))
        fan_out = math.prod(u.shape[i] for i in axes(d.output_axis))
        return u * (MUON_RMS * math.sqrt(max(fan_in, fan_out)))

    def update(updates, state, params=None):
        del params
        leaf = lambda x: isinstance(x, (optax.MaskedNode, MuonDimensionNumbers))  # noqa: E731
        return jax.tree.map(scale, updates, numbers(updates), is_leaf=leaf), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _adamw(cfg: OptimConfig, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
    )


def _muon(cfg: OptimConfig, lr: optax.Schedule, model: ModelConfig):
    """Muon (Nesterov momentum, Newton-Schulz orthogonalization, AdamW-matched RMS, decoupled
    weight decay) for `muon_dimensions`, AdamW for the rest; one schedule for both."""
    dims = muon_dimensions(model)
    numbers = _dimension_numbers(dims)
    muon = optax.chain(
        scale_by_muon(
            ns_steps=cfg.muon_ns_steps,
            beta=cfg.muon_beta,
            nesterov=True,
            weight_dimension_numbers=numbers,
        ),
        _scale_by_shape(numbers),
        optax.add_decayed_weights(cfg.weight_decay),
        optax.scale_by_learning_rate(lr),
    )

    def labels(params: Any) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda p, _: "muon" if _key(p) in dims else "adamw", params
        )

    return optax.partition({"muon": muon, "adamw": _adamw(cfg, lr)}, labels)


def describe(cfg: OptimConfig, model: ModelConfig) -> str:
    """The start-up line naming the optimizer of each parameter group."""
    if cfg.name != "muon":
        return "optimizer: adamw for every parameter (no weight decay on norms and biases)"
    names = sorted({k.split("/")[-1] for k in muon_dimensions(model)})
    return (
        f"optimizer: muon for {len(muon_dimensions(model))} hidden matrices "
        f"({', '.join(names)}: logical axes with embed and no vocab); adamw for embeddings, "
        "head, norms and anything 1-D"
    )


@functools.cache
def make_optimizer(
    cfg: OptimConfig, total_steps: int, model: ModelConfig | None = None
) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decay), or Muon + AdamW by parameter group
    (`optim.name=muon`, which needs the `model` config for its parameters' logical axes).

    Cached: the same config always gives the same object, so TrainStates built separately
    (e.g. an abstract one for shardings and the real one) have identical static parts.
    """
    lr = lr_schedule(cfg, total_steps)
    if cfg.name == "muon":
        if model is None:
            raise ValueError("optim.name=muon needs the model config (its parameters' axes)")
        tx = _muon(cfg, lr, model)
    else:
        tx = _adamw(cfg, lr)
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), tx)
    return tx
