"""The decoder-only transformer: attention, SwiGLU MLP, block and LM, one code path for every
LayerNorm placement.

Llama-style by default (RoPE, SwiGLU, no biases, optional grouped-query attention). The placement
(`ModelConfig.ln_placement`) only decides which norms a block creates and where they sit; see
`perijax.norms.residual` and docs/ln_variants.md. Training, scoring, telemetry and decoding run
through one layer loop (`Transformer._layers`): a pass differs only in its `Context` (decoding
writes to and reads from the KV cache), and the stream statistics are always sown and captured,
costing nothing where nobody reads them.

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, Dh head dim, F d_ff, V vocab.
Every parameter carries `logical_axes` metadata (batch, seq, embed, heads, kv, mlp, vocab) that the
sharding rules map onto mesh axes.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perijax import attention as attention_lib
from perijax import loss as loss_lib
from perijax import renamed, tuning
from perijax.config import ModelConfig
from perijax.norms import NORM_ROLES, Norm, norm_name, residual
from perijax.sharding import constrain
from perijax.telemetry import StreamProbe, stream_by_sublayer

__all__ = ["ModelConfig", "Transformer", "Block", "Attention", "Mlp", "count_params"]


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """Resolves `dtype="auto"` for the backend traced for (`perijax.tuning.backend()`): bfloat16
    on accelerators, float32 on CPU, where runs serve as exact references (configs/small.py sets
    bfloat16 explicitly, which pays on CPU too; docs/performance.md)."""
    if cfg.dtype == "auto":
        return jnp.bfloat16 if tuning.backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(cfg.dtype)


def check_backend(cfg: ModelConfig) -> None:
    """Fails early when a chosen kernel does not exist on this backend."""
    attention_lib.check(cfg.attention, compute_dtype(cfg))


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def mixed_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """`jnp.einsum(spec, a, b)` for two operands in `a`'s dtype (the compute dtype) with float32
    accumulation, returned in `out_dtype` (default: `a`'s dtype). `b` may be a float32 parameter:
    it is cast to the compute dtype inside, and its gradient comes back in float32.

    The backward pass casts the incoming gradient to the compute dtype too, so with bfloat16
    compute all three matmuls of a layer (forward, input and weight gradient) take bfloat16
    inputs and accumulate in float32; plain autodiff would run the two backward matmuls with a
    float32 operand, i.e. entirely in float32. With float32 compute this is exactly
    `jnp.einsum`."""
    out, _ = _einsum_fwd(spec, a, b, out_dtype)
    return out


def _einsum_fwd(spec, a, b, out_dtype):
    out = jnp.einsum(spec, a, b.astype(a.dtype), preferred_element_type=jnp.float32)
    return out.astype(out_dtype or a.dtype), (a, b)


def _einsum_bwd(spec, out_dtype, residuals, g):
    a, b = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    g = g.astype(a.dtype)
    bc = b.astype(a.dtype)
    da = jnp.einsum(f"{out},{sb}->{sa}", g, bc, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", a, g, preferred_element_type=jnp.float32)
    return da.astype(a.dtype), db.astype(b.dtype)


mixed_einsum.defvjp(_einsum_fwd, _einsum_bwd)


def _to_float8(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """Per-tensor current scaling: x times the scale that maps its amax to `dtype`'s largest
    value, cast to `dtype`; returns (that, 1 / scale). An all-zero x gets scale 1."""
    x32 = x.astype(jnp.float32)
    top = float(jnp.finfo(dtype).max)
    amax = jnp.max(jnp.abs(x32))
    scale = jnp.where(amax > 0, top / amax, 1.0)
    return jnp.clip(x32 * scale, -top, top).astype(dtype), 1.0 / scale


@partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def float8_einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """`mixed_einsum` with float8 operands: the forward multiplies float8 e4m3 copies of `a` and
    `b`, the backward an e5m2 copy of the output gradient with those; each tensor has one scale
    (its amax maps to the format's largest value, recomputed every step), every product
    accumulates in float32 and is unscaled after. The float8 copies are what the backward
    keeps. On a GPU with float8 tensor cores XLA runs these as float8 GEMMs."""
    out, _ = _float8_fwd(spec, a, b, out_dtype)
    return out


def _float8_fwd(spec, a, b, out_dtype):
    aq, a_inv = _to_float8(a, jnp.float8_e4m3fn)
    bq, b_inv = _to_float8(b, jnp.float8_e4m3fn)
    out = jnp.einsum(spec, aq, bq, preferred_element_type=jnp.float32) * (a_inv * b_inv)
    dtypes = (jnp.zeros((0,), a.dtype), jnp.zeros((0,), b.dtype))  # a's and b's dtypes
    return out.astype(out_dtype or a.dtype), (aq, a_inv, bq, b_inv, dtypes)


def _float8_bwd(spec, out_dtype, residuals, g):
    aq, a_inv, bq, b_inv, (a_dtype, b_dtype) = residuals
    inputs, out = spec.split("->")
    sa, sb = inputs.split(",")
    gq, g_inv = _to_float8(g, jnp.float8_e5m2)
    da = jnp.einsum(f"{out},{sb}->{sa}", gq, bq, preferred_element_type=jnp.float32)
    db = jnp.einsum(f"{sa},{out}->{sb}", aq, gq, preferred_element_type=jnp.float32)
    return (da * (g_inv * b_inv)).astype(a_dtype.dtype), (db * (a_inv * g_inv)).astype(
        b_dtype.dtype
    )


float8_einsum.defvjp(_float8_fwd, _float8_bwd)


def weight_einsum(cfg: ModelConfig, spec: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """A hidden weight matmul (attention and MLP projections) in `cfg.matmul_dtype`."""
    if cfg.matmul_dtype == "float8":
        return float8_einsum(spec, x, w)
    return mixed_einsum(spec, x, w)


# Renamed: `einsum` was not `jnp.einsum` but its mixed-precision version.
__getattr__ = renamed(__name__, {"einsum": "mixed_einsum"})


def _param(rngs: nnx.Rngs, std: float, shape: tuple[int, ...], axes: tuple[str, ...], dtype):
    init = jax.nn.initializers.normal(std)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _norm(cfg: ModelConfig, dim: int | None = None, norm_type: str | None = None) -> Norm:
    return Norm(
        dim or cfg.d_model,
        norm_type=norm_type or cfg.norm_type,
        eps=cfg.norm_eps,
        learnable=cfg.learnable_norm_scale,
        param_dtype=jnp.dtype(cfg.param_dtype),
    )


class Rotary(NamedTuple):
    """Rotary-embedding tables for the positions of one forward pass, float32, shaped [T, Dh/2]
    (positions shared by the batch) or [B, T, Dh/2]. Made once per forward pass by
    `rotary_tables` and shared by every layer."""

    sin: jax.Array
    cos: jax.Array


def rotary_tables(positions: jax.Array | np.ndarray, head_dim: int, theta: float) -> Rotary:
    """`Rotary` for positions [T] or [B, T]: frequencies theta^(-i / (Dh/2)), i < Dh/2.

    On CPU (`perijax.tuning`), NumPy positions (training and scoring: 0..T-1) give constant
    tables, computed here in float64 and rounded once. Computed inside the jitted step instead,
    XLA:CPU fuses the sin and cos into every rotary multiply that reads them, forward and
    backward, and evaluates them once per batch row, head and layer (an optimization barrier
    does not stop it: the CPU pipeline removes barriers before fusion; docs/performance.md has
    the cost). Elsewhere, and for traced positions (decoding, documents), the
    tables are computed in float32 in the step."""
    half = head_dim // 2
    if isinstance(positions, np.ndarray) and tuning.current().constant_rotary_tables:
        freq = float(theta) ** (-np.arange(half, dtype=np.float64) / half)
        angle = positions.astype(np.float64)[..., None] * freq
        return Rotary(*(jnp.asarray(t, jnp.float32) for t in (np.sin(angle), np.cos(angle))))
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq
    return Rotary(jnp.sin(angle), jnp.cos(angle))


def rope(x: jax.Array, rotary: Rotary) -> jax.Array:
    """Rotary embedding, rotating dims (i, i + Dh/2) as Llama does. x: [B, T, N, Dh]. Computed
    in float32."""
    half = x.shape[-1] // 2
    sin, cos = (jnp.broadcast_to(t, x.shape[:2] + (half,))[:, :, None, :] for t in rotary)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Context:
    """What every block of one forward pass shares: the rotary tables of its positions and its
    document ids (`segment_ids` [B, T] or None). Made once per pass by the Transformer.

    `keys_values` is where attention gets the keys and values it attends to: in training and
    scoring, those of the tokens themselves."""

    rotary: Rotary
    segment_ids: jax.Array | None = None
    mask: jax.Array | None = None

    def keys_values(self, attention: Attention, k: jax.Array, v: jax.Array):
        return k, v


@dataclasses.dataclass(frozen=True)
class DecodeContext(Context):
    """The Context of a decoding pass: the new tokens' keys and values are written into the KV
    cache (`Attention.cached_key`/`cached_value`) at slot `index`, and attention reads the whole
    cache through `mask` [B, T, S] (the slots each new token may attend to)."""

    index: jax.Array | None = None

    def keys_values(self, attention: Attention, k: jax.Array, v: jax.Array):
        return attention.write_cache(k, v, self.index)


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query option and optional QK-norm.

    Query head h reads kv head h // (H / K) (the Hugging Face convention). QK-norm is an RMSNorm
    before RoPE: `per_head` normalizes each head's Dh vector with a shared scale (Gemma 3),
    `full` normalizes all heads together over H*Dh (OLMo 2). For decoding, `init_cache` adds the
    KV cache as `nnx.Cache` variables.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, h, k, dh = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.depth_scaled_init else None
        self.cfg = cfg
        self.wq = _param(rngs, cfg.init_std, (d, h, dh), ("embed", "heads", "kv"), pd)
        self.wk = _param(rngs, cfg.init_std, (d, k, dh), ("embed", "heads", "kv"), pd)
        self.wv = _param(rngs, cfg.init_std, (d, k, dh), ("embed", "heads", "kv"), pd)
        self.wo = _param(rngs, out_std or cfg.init_std, (h, dh, d), ("heads", "kv", "embed"), pd)
        q_dim, k_dim = {"none": (0, 0), "per_head": (dh, dh), "full": (h * dh, k * dh)}[cfg.qk_norm]
        self.q_norm = _norm(cfg, q_dim, "rmsnorm") if q_dim else None
        self.k_norm = _norm(cfg, k_dim, "rmsnorm") if k_dim else None

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        """x: [B, T, D] -> [B, T, D], attending to the keys and values `ctx.keys_values` gives."""
        q, k, v = self._project(x, ctx.rotary)
        k, v = ctx.keys_values(self, k, v)
        out = attention_lib.attend(
            self.cfg.attention, q, k, v, segment_ids=ctx.segment_ids, mask=ctx.mask
        )
        out = constrain(out, ("batch", "seq", "heads", "kv"))
        return weight_einsum(self.cfg, "bthk,hkd->btd", out, self.wo[...])

    def _project(self, x: jax.Array, rotary: Rotary):
        """Queries [B, T, H, Dh], keys and values [B, T, K, Dh] of x, QK-normed and rotated."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = weight_einsum(cfg, "btd,dhk->bthk", x, self.wq[...])
        kk = weight_einsum(cfg, "btd,dhk->bthk", x, self.wk[...])
        v = weight_einsum(cfg, "btd,dhk->bthk", x, self.wv[...])
        if cfg.qk_norm == "per_head":
            q, kk = self.q_norm(q), self.k_norm(kk)
        elif cfg.qk_norm == "full":
            q = self.q_norm(q.reshape(b, t, h * dh)).reshape(b, t, h, dh)
            kk = self.k_norm(kk.reshape(b, t, k * dh)).reshape(b, t, k, dh)
        q = constrain(rope(q, rotary), ("batch", "seq", "heads", "kv"))
        return q, rope(kk, rotary), v

    def init_cache(self, shape: tuple[int, ...], dtype) -> None:
        """Empty KV cache variables of `shape` [B, S, K, Dh] ([L, B, S, K, Dh] when stacked)."""
        self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
        self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))

    def write_cache(self, k: jax.Array, v: jax.Array, index: jax.Array):
        """Writes keys and values [B, T, K, Dh] to cache slots index..index+T-1 and returns the
        whole cache (keys, values [B, S, K, Dh]) in k's dtype."""
        at = (0, index, 0, 0)
        for var, new in ((self.cached_key, k), (self.cached_value, v)):
            var[...] = jax.lax.dynamic_update_slice(var[...], new.astype(var.dtype), at)
        return self.cached_key[...].astype(k.dtype), self.cached_value[...].astype(k.dtype)


class Mlp(nnx.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down. x: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.depth_scaled_init else None
        self.w_gate = _param(rngs, cfg.init_std, (d, f), ("embed", "mlp"), pd)
        self.w_up = _param(rngs, cfg.init_std, (d, f), ("embed", "mlp"), pd)
        self.w_down = _param(rngs, out_std or cfg.init_std, (f, d), ("mlp", "embed"), pd)
        self.cfg = cfg

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = weight_einsum(self.cfg, "btd,df->btf", x, self.w_gate[...])
        up = weight_einsum(self.cfg, "btd,df->btf", x, self.w_up[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return weight_einsum(self.cfg, "btf,fd->btd", hidden, self.w_down[...])


class Block(nnx.Module):
    """One transformer block: an attention and an MLP residual sublayer.

    Creates only the norms its placement uses, named by the tensor they normalize:
    `{attn,mlp}_{input,output,residual}_norm` (NORM_ROLES in perijax/norms.py). The two
    `StreamProbe`s sow each sublayer's stream statistics (no parameters).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.placement = cfg.ln_placement
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        for sublayer in ("attn", "mlp"):
            for role in NORM_ROLES[cfg.ln_placement]:
                setattr(self, norm_name(sublayer, role), _norm(cfg))
        self.attn_stream = StreamProbe()
        self.mlp_stream = StreamProbe()

    def __call__(self, x: jax.Array, ctx: Context) -> jax.Array:
        """x: [B, T, D] residual stream -> [B, T, D]."""
        x = residual(self.placement, x, partial(self.attn, ctx=ctx), **self._around("attn"))
        return residual(self.placement, x, self.mlp, **self._around("mlp"))

    def _around(self, sublayer: str) -> dict[str, Norm | StreamProbe]:
        """The norms of `sublayer` ("attn" or "mlp") by role, and its stream probe."""
        roles = NORM_ROLES[self.placement]
        norms = {f"{role}_norm": getattr(self, norm_name(sublayer, role)) for role in roles}
        return {**norms, "probe": getattr(self, f"{sublayer}_stream")}


REMAT_POLICIES = {
    # Save the outputs of weight matmuls (no batch dims); recompute attention scores and
    # elementwise ops in the backward pass.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save only the block input; recompute the whole block.
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _block_fn(graphdef: nnx.GraphDef, ctx: Context, remat: str):
    """(x, block state) -> (x, what the block changed): one block, optionally rematerialized,
    shaped for scan. What it changed is its sown telemetry (`nnx.Intermediate`) and, decoding,
    its KV cache (`nnx.Cache`); scanned, both come out [L]-stacked."""

    def body(x, state):
        block = nnx.merge(graphdef, state)
        x, sown = nnx.capture(block, nnx.Intermediate)(x, ctx)
        return constrain(x, ("batch", "seq", None)), (sown, nnx.state(block, nnx.Cache))

    if remat == "none":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)


def stack_layers(blocks: list[Block]) -> Block:
    """One Block whose parameters carry a leading `layers` axis (for `scan_layers`)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(block) for block in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class LossSums(NamedTuple):
    """What `Transformer.loss` returns: sums, so that batches combine exactly."""

    total: jax.Array  # summed next-token cross-entropy (nats), float32
    count: jax.Array  # positions counted
    stream: dict[str, dict[str, jax.Array]]  # per-layer stream statistics (stream_by_sublayer)


class Transformer(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] (float32).

    With `scan_layers` the blocks are one Block with stacked [L, ...] parameters applied by
    `jax.lax.scan` (compile time independent of depth); otherwise a list of L blocks. Both are
    initialized identically for the same seed and apply the same per-block function, in one
    layer loop (`_layers`) that training, scoring and decoding share.

    Every forward pass measures the residual stream: each block's probes sow their statistics,
    the layer loop captures them (`nnx.capture`), and `loss` returns them. A caller that ignores
    them pays nothing under `jax.jit`: XLA removes the unused computation.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        vocab_axes = ("vocab", "embed")
        self.embed = _param(rngs, cfg.init_std, (cfg.vocab_size, cfg.d_model), vocab_axes, pd)
        self.embed_norm = _norm(cfg) if cfg.embed_norm else None
        blocks = [Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)]
        self.blocks = stack_layers(blocks) if cfg.scan_layers else nnx.List(blocks)
        self.final_norm = _norm(cfg) if cfg.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else _param(rngs, cfg.init_std, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> jax.Array:
        """logits [B, T, V] float32 of tokens [B, T] at `positions` [T] or [B, T] (default
        0..T-1). Packed sequences: `segment_ids` [B, T] (`attention.document_ids`) keep attention
        within each document, and positions restart at each document's first token."""
        return self._head(self.hidden(tokens, positions, segment_ids=segment_ids)[0])

    def loss(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        mask: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> LossSums:
        """`LossSums` of inputs `tokens` [B, T] and their `targets` [B, T]; `mask` [B, T] marks
        the positions that count (None: all); `segment_ids` [B, T] as in `__call__`. The output
        head and the loss run in chunks of `ModelConfig.loss_chunk_len` positions without
        whole-batch logits (`perijax.loss`); the result equals the cross-entropy of the whole
        logits `self(tokens)` (tests/test_loss.py checks it)."""
        x, stream = self.hidden(tokens, segment_ids=segment_ids)
        b, t = tokens.shape
        vocab_first = self.lm_head is None
        w = self.embed[...] if vocab_first else self.lm_head[...]
        chunk = loss_lib.chunk_len_for(self.cfg.loss_chunk_len, b, t, self.cfg.vocab_size)
        out = loss_lib.head_loss(x, w, targets, mask, chunk_len=chunk, vocab_first=vocab_first)
        return LossSums(*out, stream)

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        segment_ids: jax.Array | None = None,
    ) -> tuple[jax.Array, dict]:
        """(final hidden states [B, T, D] in the compute dtype, after the final norm; the
        per-layer stream statistics): everything but the output head."""
        if positions is None and segment_ids is not None:
            positions = attention_lib.document_positions(segment_ids)
        x, rotary = self._embed(tokens, positions)
        x, stream = self._layers(x, Context(rotary, segment_ids))
        return self._final(x), stream

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> None:
        """Adds an empty KV cache of `max_len` slots (compute dtype unless `dtype` is given) for
        `decode`: keys and values in every attention layer, the slots holding a real token
        (`cache_valid` [B, S]) and the next slot to write (`cache_index`), all `nnx.Cache`."""
        cfg = self.cfg
        shape = (batch_size, max_len, cfg.kv_heads, cfg.dim_per_head)
        dtype = dtype or compute_dtype(cfg)
        if cfg.scan_layers:
            self.blocks.attn.init_cache((cfg.num_layers, *shape), dtype)
        else:
            for block in self.blocks:
                block.attn.init_cache(shape, dtype)
        self.cache_valid = nnx.Cache(jnp.zeros((batch_size, max_len), bool))
        self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

    def decode(
        self, tokens: jax.Array, positions: jax.Array, valid: jax.Array | None = None
    ) -> jax.Array:
        """Logits [B, T, V] of tokens [B, T] written to cache slots index..index+T-1 (after
        `init_cache`), each attending to every valid slot up to its own. `valid` [B, T] marks
        padding tokens (False) that nothing may attend to; `positions` [B, T] (a left-padded
        row's first real token has position 0)."""
        b, t = tokens.shape
        valid = jnp.ones((b, t), bool) if valid is None else valid
        index = self.cache_index[...]
        slots_valid = jax.lax.dynamic_update_slice(self.cache_valid[...], valid, (0, index))
        slots = jnp.arange(slots_valid.shape[1])
        query_slots = index + jnp.arange(t)
        mask = slots_valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])
        x, rotary = self._embed(tokens, positions)
        x, _ = self._layers(x, DecodeContext(rotary, mask=mask, index=index))
        self.cache_valid[...] = slots_valid
        self.cache_index[...] = index + t
        return self._head(self._final(x))

    def _embed(self, tokens: jax.Array, positions) -> tuple[jax.Array, Rotary]:
        cfg = self.cfg
        if positions is None:
            positions = np.arange(tokens.shape[-1])  # static: constant rotary tables
        x = jnp.take(self.embed[...], tokens, axis=0).astype(compute_dtype(cfg))
        x = constrain(x, ("batch", "seq", None))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x, rotary_tables(positions, cfg.dim_per_head, cfg.rope_theta)

    def _layers(self, x: jax.Array, ctx: Context) -> tuple[jax.Array, dict]:
        """Every block in order: the one layer loop. Returns x and the stream statistics the
        blocks sowed (`telemetry.stream_by_sublayer`); a decoding pass's KV cache is written
        back into the blocks."""
        cfg = self.cfg
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            x, (sown, cache) = jax.lax.scan(_block_fn(graphdef, ctx, cfg.remat), x, state)
            nnx.update(self.blocks, cache)
            return x, stream_by_sublayer(sown)
        per_layer = []
        for block in self.blocks:
            graphdef, state = nnx.split(block)
            x, (sown, cache) = _block_fn(graphdef, ctx, cfg.remat)(x, state)
            nnx.update(block, cache)
            per_layer.append(sown)
        return x, stream_by_sublayer(jax.tree.map(lambda *v: jnp.stack(v), *per_layer))

    def _final(self, x: jax.Array) -> jax.Array:
        return x if self.final_norm is None else self.final_norm(x)

    def _head(self, x: jax.Array) -> jax.Array:
        """logits [B, T, V] float32 of final hidden states x."""
        if self.lm_head is None:  # tied: the [V, D] embedding as is (a transposed operand
            # sends XLA:CPU's bfloat16 weight-gradient dot to an unsupported kernel)
            logits = mixed_einsum("btd,vd->btv", x, self.embed[...], jnp.float32)
        else:
            logits = mixed_einsum("btd,dv->btv", x, self.lm_head[...], jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts without allocating: total, embedding (input + untied output), norms."""
    counts = {"total": 0, "embedding": 0, "norm": 0}
    for path, param in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
        n = math.prod(param.shape)
        keys = [str(key) for key in path]
        counts["total"] += n
        if keys[0] in ("embed", "lm_head"):
            counts["embedding"] += n
        if any(key.endswith("norm") for key in keys):
            counts["norm"] += n
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts
