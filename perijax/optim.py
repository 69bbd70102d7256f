"""Optax optimizer: learning-rate schedules, global-norm clipping, AdamW with a weight-decay mask
chosen by parameter path (norm scales and biases are never decayed)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from perijax.config import OptimConfig, wsd_decay_steps


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


@functools.cache
def make_optimizer(cfg: OptimConfig, total_steps: int) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW(schedule, masked decay).

    Cached: the same config always gives the same object, so TrainStates built separately
    (e.g. an abstract one for shardings and the real one) have identical static parts.
    """
    adamw = optax.adamw(
        lr_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.grad_clip_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.grad_clip_norm), adamw)
    return adamw
