"""Normalization layers and the residual connection for each LayerNorm placement.

The four placements of Kim et al. (arXiv 2502.02732, "Peri-LN") differ only in where a norm sits
around a sublayer F (attention or MLP). They are written side by side in `residual`, so the
equations in docs/ln_variants.md map one-to-one onto code lines.

Norm statistics are always computed in float32, whatever the compute dtype: a bfloat16 mean of
squares loses the precision the placements are being compared on. The backward pass recomputes
a norm from its input rather than keeping its float32 intermediates (`_normalize`).
"""

from __future__ import annotations

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
    Input and output shapes: [..., dim]; the output has the input's dtype.
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
        scale = None if self.scale is None else self.scale[...]
        bias = None if self.bias is None else self.bias[...]
        return _normalize(x, scale, bias, self.norm_type == "layernorm", self.eps)


def _normalize_fn(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, center: bool, eps: float
) -> jax.Array:
    h = x.astype(jnp.float32)
    if center:
        h = h - jnp.mean(h, axis=-1, keepdims=True)
    h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
    if scale is not None:
        h = h * scale.astype(jnp.float32)
    if bias is not None:
        h = h + bias.astype(jnp.float32)
    return h.astype(x.dtype)


# Rematerialized: autodiff would keep three float32 copies of the activation per norm (the cast
# input, its square, the normalized value) for the backward pass; recomputing them from the
# input costs a few elementwise passes and keeps only the input. For configs/small.py that is
# 0.6 GiB less per step for Pre-LN and 1.1 GiB less for Peri-LN, whose extra norms would
# otherwise add a quarter to the step's activation memory (docs/performance.md).
_normalize = jax.checkpoint(
    _normalize_fn, static_argnums=(3, 4), policy=jax.checkpoint_policies.nothing_saveable
)


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
