"""Normalization layers and the residual connection for each LayerNorm placement.

The four placements of Kim et al. (arXiv 2502.02732, "Peri-LN") differ only in where a norm sits
around a sublayer F (attention or MLP). They are written side by side in `residual`, so the
equations in docs/ln_variants.md map one-to-one onto code lines.

Norm statistics are always computed in float32, whatever the compute dtype: a bfloat16 mean of
squares loses the precision the placements are being compared on.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from perijax import tuning
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
    Input and output shapes: [..., dim]; the output has the input's dtype. Differentiated by
    autodiff, except where `perijax.tuning` selects the written-out backward passes of
    `perijax.tuning.cpu_kernels` (on CPU).
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
        scale = None if self.scale is None else self.scale[...].astype(jnp.float32)
        kernels = tuning.norm_kernels()  # the one backend switch: None = autodiff
        if kernels and self.norm_type == "rmsnorm":
            ones = jnp.ones(x.shape[-1])
            return kernels.rms_norm(x, ones if scale is None else scale, self.eps)
        h = x.astype(jnp.float32)
        if self.norm_type == "layernorm":
            h = h - jnp.mean(h, axis=-1, keepdims=True)
        h = h * inv_rms(h, self.eps)
        if scale is not None:
            h = kernels.scale_rows(h, scale) if kernels else h * scale
        if self.bias is not None:
            h = h + self.bias[...].astype(jnp.float32)
        return h.astype(x.dtype)


def inv_rms(h: jax.Array, eps: float) -> jax.Array:
    """1 / sqrt(mean(h^2) + eps) over the last axis of a float32 h, kept as [..., 1]: the one
    statistic of both norm types (LayerNorm applies it to the centred input)."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)


def residual(
    placement: str,
    x: jax.Array,
    f: Callable[[jax.Array], jax.Array],
    *,
    probe: Callable[[jax.Array, jax.Array], None],
    input_norm: Norm | None = None,
    output_norm: Norm | None = None,
    residual_norm: Norm | None = None,
) -> jax.Array:
    """One residual sublayer `x -> y` for a LayerNorm placement (PAPER.md, docs/ln_variants.md):
    `added` is what the sublayer adds to the stream x.

    Only the norms named in NORM_ROLES[placement] are passed; the others stay None. `probe` is
    shown the new stream y and `added` (in the model, a `telemetry.StreamProbe`, which sows
    their statistics).
    """
    match placement:
        case "pre":  # GPT-2 / Llama
            y = x + (added := f(input_norm(x)))
        case "post":  # original Transformer
            y = residual_norm(x + (added := f(x)))
        case "peri":  # Peri-LN, Gemma 2/3, OLMo-core peri_norm
            y = x + (added := output_norm(f(input_norm(x))))
        case "output":  # OLMo 2 "reordered norm"
            y = x + (added := output_norm(f(x)))
        case _:
            raise ValueError(f"unknown ln_placement {placement!r}: expected one of {PLACEMENTS}")
    probe(y, added)
    return y
