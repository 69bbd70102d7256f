"""Backward passes written out for XLA:CPU: RMSNorm and LayerNorm's scale.

XLA:CPU cannot fuse an elementwise producer into a reduction, so every full-size float32
temporary of a norm's autodiff backward is a write and a read of the whole activation, and it
splits a reduction over the leading axes into a strided reduce-window and a reduce. These
versions compute the same gradients with one temporary and with the reductions as dots
(docs/performance.md, "The norms' backward pass"). They run where `perijax.tuning` says so
(on CPU); GPU and TPU compilers fuse the autodiff version themselves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from perijax.norms import inv_rms


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, `x / sqrt(mean(x^2) + eps) * scale` in float32, returned in
    x's dtype. x: [..., d]; scale: [d] float32.

    The forward pass is the formula. The backward pass is written out to move less memory than
    autodiff's: with r = 1 / sqrt(mean(x^2) + eps) saved from the forward pass (one float32 per
    row) and g the output gradient,

        dx = r * g * scale - x * r^3 * sum_d(g * scale * x) / d
        dscale = sum_rows(r * g * x)

    and both sums are products (`dot_general`, float32) with the one float32 array g * x, the
    only full-size temporary; autodiff materialized three. XLA:CPU cannot fuse an elementwise
    producer into a reduction, so each such temporary is a write and a read of the whole
    activation in float32 (docs/performance.md)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    h = x.astype(jnp.float32)
    r = inv_rms(h, eps)
    return (h * r * scale).astype(x.dtype), (x, scale, r)


def _rms_norm_bwd(eps, residuals, g):
    del eps
    x, scale, r = residuals
    h, g = x.astype(jnp.float32), g.astype(jnp.float32)
    gh = g * h
    last, lead = h.ndim - 1, tuple(range(h.ndim - 1))
    c = _dot(gh, scale, ((last,), (0,)))[..., None]  # sum_d g * scale * x, per row
    dscale = _dot(r[..., 0], gh, (lead, lead))  # sum_rows r * g * x
    dx = r * (g * scale) - h * (r * r * r) * (c / h.shape[-1])
    return dx.astype(x.dtype), dscale


rms_norm.defvjp(_rms_norm_fwd, _rms_norm_bwd)


def _dot(a: jax.Array, b: jax.Array, contract: tuple) -> jax.Array:
    """A float32 contraction of a and b over the axes `contract` = (a's, b's), as a dot. HIGHEST:
    float32 on every backend (TPUs round the operands to bfloat16, GPUs to TensorFloat-32, by
    default)."""
    return jax.lax.dot_general(
        a,
        b,
        (contract, ((), ())),
        precision=jax.lax.Precision.HIGHEST,
        preferred_element_type=jnp.float32,
    )


@jax.custom_vjp
def scale_rows(h: jax.Array, scale: jax.Array) -> jax.Array:
    """`h * scale` for h [..., d] and scale [d], float32 (LayerNorm's scale).

    Differentiated as autodiff would, except that the scale gradient's sum over every row,
    sum_rows(g * h), is a vector-matrix product ones @ (g * h) instead of a reduction over the
    leading axes. XLA:CPU splits such a reduction into a strided reduce-window and a reduce, about
    5 ms per norm of configs/small.py; the dot takes about 1 ms (docs/performance.md). The result
    is the same sum, accumulated in float32."""
    return h * scale


def _scale_rows_fwd(h, scale):
    return h * scale, (h, scale)


def _scale_rows_bwd(residuals, g):
    h, scale = residuals
    lead = tuple(range(h.ndim - 1))  # contracted in place: no reshape of sharded axes
    dscale = _dot(jnp.ones(h.shape[:-1], h.dtype), g * h, (lead, lead))
    return g * scale, dscale.astype(scale.dtype)


scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)
