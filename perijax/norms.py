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
# (`norm_name`): "input" = the sublayer input, "output" = the sublayer output before the add,
# "residual" = the residual stream after the add.
NORM_ROLES: dict[str, tuple[str, ...]] = {
    "pre": ("input",),
    "post": ("residual",),
    "peri": ("input", "output"),
    "output": ("output",),
}


def norm_name(sublayer: str, role: str) -> str:
    """The attribute name of a block's norm: `norm_name("attn", "input")` is "attn_input_norm",
    the norm of the attention sublayer's input (roles as in NORM_ROLES)."""
    return f"{sublayer}_{role}_norm"


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, statistics in float32.

    rmsnorm:   y = x / sqrt(mean(x^2) + eps) * scale
    layernorm: y = (x - mean(x)) / sqrt(var(x) + eps) * scale + bias

    With `learnable=False` the module has no parameters (scale fixed to 1, no bias).
    Input and output shapes: [..., dim]; the output has the input's dtype. `rms_norm` and
    `layer_norm` below are the formulas; `perijax.tuning` may hand a backend's version of them
    with the same values and a written-out backward pass.
    """

    def __init__(
        self, dim: int, *, norm_type: str, eps: float, learnable: bool, param_dtype: jnp.dtype
    ):
        if norm_type not in NORMALIZE:
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
        normalize = tuning.normalizer(self.norm_type, NORMALIZE[self.norm_type])
        return normalize(x, _float32(self.scale), _float32(self.bias), self.eps)


def _float32(param: nnx.Param | None) -> jax.Array | None:
    return None if param is None else param[...].astype(jnp.float32)


def rms_norm(x: jax.Array, scale: jax.Array | None, bias: None, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis, in float32, returned in x's dtype
    (an RMSNorm has no bias: always None)."""
    h = x.astype(jnp.float32)
    return scale_and_shift(h * inv_rms(h, eps), scale, bias).astype(x.dtype)


def layer_norm(
    x: jax.Array, scale: jax.Array | None, bias: jax.Array | None, eps: float
) -> jax.Array:
    """(x - mean(x)) / sqrt(var(x) + eps) * scale + bias over the last axis, in float32,
    returned in x's dtype."""
    h = x.astype(jnp.float32)
    h = h - jnp.mean(h, axis=-1, keepdims=True)
    return scale_and_shift(h * inv_rms(h, eps), scale, bias).astype(x.dtype)


NORMALIZE: dict[str, Callable] = {"rmsnorm": rms_norm, "layernorm": layer_norm}


def scale_and_shift(h: jax.Array, scale: jax.Array | None, bias: jax.Array | None) -> jax.Array:
    """h * scale + bias, each part only where it exists (float32)."""
    h = h if scale is None else h * scale
    return h if bias is None else h + bias


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
    """One residual sublayer `x -> y` for a LayerNorm placement (docs/paper.md,
    docs/ln_variants.md): `added` is what the sublayer adds to the stream x.

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
