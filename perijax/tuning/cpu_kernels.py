"""Norms with backward passes written out for XLA:CPU: `NORMALIZE` holds the versions of
`perijax.norms.rms_norm` and `perijax.norms.layer_norm` that `perijax.tuning.normalizer` hands
`perijax.norms.Norm` on CPU. They compute the same values; their backward passes keep fewer
full-size float32 temporaries and compute the sums over rows and columns as dots, which XLA:CPU
runs faster than the reductions of autodiff's (docs/performance.md, "On CPU: rotary tables and
the norms' backward pass", has the profile and the numbers). GPU and TPU compilers fuse the
autodiff versions themselves.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def normalize_rms(x: jax.Array, scale: jax.Array | None, bias: None, eps: float) -> jax.Array:
    """`perijax.norms.rms_norm` with `rms_norm`'s backward pass (a fixed scale is ones)."""
    del bias  # an RMSNorm has none
    return rms_norm(x, jnp.ones(x.shape[-1]) if scale is None else scale, eps)


def normalize_layer(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float
) -> jax.Array:
    """`perijax.norms.layer_norm` with `scale_rows`' backward pass for the scale."""
    h = x.astype(jnp.float32)
    h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * _inv_rms(h, eps)
    if scale is not None:
        h = scale_rows(h, scale)
    if bias is not None:
        h = h + bias
    return h.astype(x.dtype)


NORMALIZE = {"rmsnorm": normalize_rms, "layernorm": normalize_layer}


def _inv_rms(h: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(h^2) + eps), as `perijax.norms.inv_rms` (this package does not import the
    model's modules: they import it)."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm over the last axis, `x / sqrt(mean(x^2) + eps) * scale` in float32, returned in
    x's dtype. x: [..., d]; scale: [d] float32.

    The forward pass is the formula. The backward pass is written out: with
    r = 1 / sqrt(mean(x^2) + eps) saved from the forward pass (one float32 per row) and g the
    output gradient,

        dx = r * g * scale - x * r^3 * sum_d(g * scale * x) / d
        dscale = sum_rows(r * g * x)

    and both sums are products (`dot_general`, float32) with the one float32 array g * x, the
    only full-size temporary (autodiff materializes three)."""
    return _rms_norm_fwd(x, scale, eps)[0]


def _rms_norm_fwd(x, scale, eps):
    h = x.astype(jnp.float32)
    r = _inv_rms(h, eps)
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
    leading axes, which XLA:CPU splits into a slower strided reduce-window and a reduce. The
    result is the same sum, accumulated in float32."""
    return h * scale


def _scale_rows_fwd(h, scale):
    return h * scale, (h, scale)


def _scale_rows_bwd(residuals, g):
    h, scale = residuals
    lead = tuple(range(h.ndim - 1))  # contracted in place: no reshape of sharded axes
    dscale = _dot(jnp.ones(h.shape[:-1], h.dtype), g * h, (lead, lead))
    return g * scale, dscale.astype(scale.dtype)


scale_rows.defvjp(_scale_rows_fwd, _scale_rows_bwd)
