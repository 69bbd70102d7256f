"""Normalization layers and the residual connection for each LayerNorm placement.

The four placements of Kim et al. (arXiv 2502.02732, "Peri-LN") differ only in where a norm sits
around a sublayer F (attention or MLP). They are written side by side in `residual`, so the
equations in docs/ln_variants.md map one-to-one onto code lines.

Norm statistics are always computed in float32, whatever the compute dtype: a bfloat16 mean of
squares loses the precision the placements are being compared on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from perijax.config import NORM_TYPES, PLACEMENTS

# Which norms each placement creates around one sublayer, named by the tensor they normalize
# (STYLE.md): "input" = the sublayer input, "output" = the sublayer output before the add,
# "residual" = the residual stream after the add.
NORM_ROLES: dict[str, tuple[str, ...]] = {
    "pre": ("input",),
    "post": ("residual",),
    "peri": ("input", "output"),
    "output": ("output",),
}


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, statistics in float32.

    rmsnorm:   y = x / sqrt(mean(x^2) + eps) * scale
    layernorm: y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

    With `learnable=False` the module has no parameters (scale fixed to 1, no bias).
    Input and output shapes: [..., dim]; the output has the input's dtype. RMSNorm runs through
    `rms_norm` (its backward pass written out), LayerNorm through autodiff with `scale_rows`.
    """

    def __init__(
        self,
        dim: int,
        *,
        norm_type: str = "rmsnorm",
        eps: float = 1e-6,
        learnable: bool = True,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if norm_type not in NORM_TYPES:
            raise ValueError(f"unknown norm_type {norm_type!r}: expected one of {NORM_TYPES}")
        self.norm_type = norm_type
        self.eps = eps
        has_bias = learnable and norm_type == "layernorm"
        # Assigned once each: nnx decides from the first assignment whether a field is data.
        self.scale = (
            nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("embed",)) if learnable else None
        )
        self.bias = (
            nnx.Param(jnp.zeros((dim,), param_dtype), logical_axes=("embed",)) if has_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.norm_type == "rmsnorm":
            scale = self.scale[...] if self.scale is not None else jnp.ones(x.shape[-1])
            return rms_norm(x, scale.astype(jnp.float32), self.eps)
        h = x.astype(jnp.float32)
        if self.norm_type == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * inv_rms(h, self.eps)
        if self.scale is not None:
            h = scale_rows(h, self.scale[...].astype(jnp.float32))
        if self.bias is not None:
            h = h + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


def inv_rms(h: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(h^2) + eps) over the last axis of a float32 h, kept as [..., 1]: the one
    statistic of both norm types (LayerNorm applies it to the centred input)."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)


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


def residual(
    placement: str,
    x: jax.Array,
    f: Callable[[jax.Array], jax.Array],
    input_norm: Norm | None = None,
    output_norm: Norm | None = None,
    residual_norm: Norm | None = None,
) -> jax.Array:
    """One residual sublayer `x -> y` for a LayerNorm placement (PAPER.md, docs/ln_variants.md).

    Only the norms named in NORM_ROLES[placement] are passed; the others stay None.
    """
    match placement:
        case "pre":  # GPT-2 / Llama
            return x + f(input_norm(x))
        case "post":  # original Transformer
            return residual_norm(x + f(x))
        case "peri":  # Peri-LN, Gemma 2/3, OLMo-core peri_norm
            return x + output_norm(f(input_norm(x)))
        case "output":  # OLMo 2 "reordered norm"
            return x + output_norm(f(x))
    raise ValueError(f"unknown ln_placement {placement!r}: expected one of {PLACEMENTS}")
