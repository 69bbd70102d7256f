"""The decoder-only transformer: attention, SwiGLU MLP, block and LM, one code path for every
LayerNorm placement.

Llama-style by default (RoPE, SwiGLU, no biases, optional grouped-query attention). The placement
(`ModelConfig.ln_placement`) only decides which norms a block creates and where they sit; see
`perijax.norms.residual` and docs/ln_variants.md.

Shapes: B batch, T sequence, D d_model, H query heads, K kv heads, Dh head dim, F d_ff, V vocab.
Every parameter carries `logical_axes` metadata (batch, seq, embed, heads, kv, mlp, vocab) that the
sharding rules map onto mesh axes.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from perijax import attention as attention_lib
from perijax import loss as loss_lib
from perijax import tuning
from perijax.config import ModelConfig
from perijax.norms import NORM_ROLES, Norm, residual
from perijax.sharding import constrain
from perijax.telemetry import stream_stats

__all__ = ["ModelConfig", "Transformer", "Block", "Attention", "Mlp", "count_params"]


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """Resolves `dtype="auto"`: bfloat16 on accelerators, float32 on CPU, where runs serve as
    exact references (bfloat16 is about 1.6x faster there too and is set explicitly, as in
    configs/small.py; docs/performance.md)."""
    if cfg.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(cfg.dtype)


def check_backend(cfg: ModelConfig) -> None:
    """Fails early when a chosen kernel does not exist on this backend."""
    attention_lib.check(cfg.attention, compute_dtype(cfg))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def einsum(spec: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
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


einsum.defvjp(_einsum_fwd, _einsum_bwd)


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
    does not stop it: the CPU pipeline removes barriers before fusion); on configs/small.py
    about 0.45 s of a 4.5 s step. Elsewhere, and for traced positions (decoding, documents), the
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


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query option and optional QK-norm.

    Query head h reads kv head h // (H / K) (the Hugging Face convention). QK-norm is an RMSNorm
    before RoPE: `per_head` normalizes each head's Dh vector with a shared scale (Gemma 3),
    `full` normalizes all heads together over H*Dh (OLMo 2).
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

    def __call__(
        self,
        x: jax.Array,
        rotary: Rotary,
        cache: LayerCache | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """x: [B, T, D] -> [B, T, D]; with a `cache`, also the cache with this step's keys and
        values written at `cache.index`. `segment_ids` [B, T]: attend within documents only."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = einsum("btd,dhk->bthk", x, self.wq[...])
        kk = einsum("btd,dhk->bthk", x, self.wk[...])
        v = einsum("btd,dhk->bthk", x, self.wv[...])
        if cfg.qk_norm == "per_head":
            q, kk = self.q_norm(q), self.k_norm(kk)
        elif cfg.qk_norm == "full":
            q = self.q_norm(q.reshape(b, t, h * dh)).reshape(b, t, h, dh)
            kk = self.k_norm(kk.reshape(b, t, k * dh)).reshape(b, t, k, dh)
        q, kk = rope(q, rotary), rope(kk, rotary)

        q = constrain(q, ("batch", "seq", "heads", "kv"))
        if cache is not None:
            at = (0, cache.index, 0, 0)
            cache = cache._replace(
                k=jax.lax.dynamic_update_slice(cache.k, kk.astype(cache.k.dtype), at),
                v=jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), at),
            )
            keys, values = cache.k.astype(x.dtype), cache.v.astype(x.dtype)
            out = attention_lib.attend(cfg.attention, q, keys, values, mask=cache.mask)
        else:
            out = attention_lib.attend(cfg.attention, q, kk, v, segment_ids=segment_ids)
        out = constrain(out, ("batch", "seq", "heads", "kv"))
        out = einsum("bthk,hkd->btd", out, self.wo[...])
        return out if cache is None else (out, cache)


class Mlp(nnx.Module):
    """SwiGLU: (silu(x W_gate) * (x W_up)) W_down. x: [B, T, D] -> [B, T, D]."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pd = jnp.dtype(cfg.param_dtype)
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.depth_scaled_init else None
        self.w_gate = _param(rngs, cfg.init_std, (d, f), ("embed", "mlp"), pd)
        self.w_up = _param(rngs, cfg.init_std, (d, f), ("embed", "mlp"), pd)
        self.w_down = _param(rngs, out_std or cfg.init_std, (f, d), ("mlp", "embed"), pd)

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = einsum("btd,df->btf", x, self.w_gate[...])
        up = einsum("btd,df->btf", x, self.w_up[...])
        hidden = constrain(jax.nn.silu(gate) * up, ("batch", "seq", "mlp"))
        return einsum("btf,fd->btd", hidden, self.w_down[...])


class Block(nnx.Module):
    """One transformer block: an attention and an MLP residual sublayer.

    Creates only the norms its placement uses, named by the tensor they normalize:
    `{attn,mlp}_{input,output,residual}_norm` (NORM_ROLES in perijax/norms.py).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.placement = cfg.ln_placement
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp = Mlp(cfg, rngs=rngs)
        for sublayer in ("attn", "mlp"):
            for role in NORM_ROLES[cfg.ln_placement]:
                setattr(self, f"{sublayer}_{role}_norm", _norm(cfg))

    def _norms(self, sublayer: str) -> dict[str, Norm]:
        return {
            f"{role}_norm": getattr(self, f"{sublayer}_{role}_norm")
            for role in NORM_ROLES[self.placement]
        }

    def __call__(
        self,
        x: jax.Array,
        rotary: Rotary,
        *,
        collect_stats: bool = False,
        cache: LayerCache | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """x: [B, T, D] residual stream -> [B, T, D] (`rotary`: the tables of x's positions,
        `rotary_tables`; `segment_ids` [B, T]: attend within documents); with `collect_stats`,
        also a dict
        {"attn": stats, "mlp": stats} of scalar telemetry (`stream_stats`); with a KV `cache`,
        (x, updated cache)."""
        if cache is not None:
            holder = {}

            def attn(h):
                out, holder["cache"] = self.attn(h, rotary, cache)
                return out

            x = residual(self.placement, x, attn, **self._norms("attn"))
            x = residual(self.placement, x, self.mlp, **self._norms("mlp"))
            return x, holder["cache"]
        sublayers = {
            "attn": lambda h: self.attn(h, rotary, segment_ids=segment_ids),
            "mlp": self.mlp,
        }
        stats = {}
        for name, f in sublayers.items():
            norms = self._norms(name)
            if not collect_stats:
                x = residual(self.placement, x, f, **norms)
                continue
            # Taps record what the sublayer outputs and what is added to the stream, without
            # touching the placement equations in `residual`.
            taps = {}
            tapped = _tap(f, taps, "out")
            if "output_norm" in norms:
                norms = {**norms, "output_norm": _tap(norms["output_norm"], taps, "added")}
            x = residual(self.placement, x, tapped, **norms)
            stats[name] = stream_stats(x, taps.get("added", taps["out"]))
        return (x, stats) if collect_stats else x


class LayerCache(NamedTuple):
    """One layer's view of the KV cache during decoding (S cache slots).

    k, v: [B, S, K, Dh] keys/values of every slot written so far; mask: [B, T, S] which slots
    each of the T new tokens may attend to; index: the slot the first new token is written to.
    """

    k: jax.Array
    v: jax.Array
    mask: jax.Array
    index: jax.Array


class KVCache(NamedTuple):
    """The KV cache of all layers for incremental decoding (`Transformer.__call__(cache=...)`).

    k, v: [L, B, S, K, Dh]; valid: [B, S] slots holding a real (non-padding) token; index: int32
    scalar, the next slot to write. Create with `Transformer.init_cache`.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    index: jax.Array


def _tap(f, taps: dict, name: str):
    def tapped(h):
        taps[name] = f(h)
        return taps[name]

    return tapped


REMAT_POLICIES = {
    # Save the outputs of weight matmuls (no batch dims); recompute attention scores and
    # elementwise ops in the backward pass.
    "minimal": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Save only the block input; recompute the whole block.
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _block_fn(
    graphdef: nnx.GraphDef,
    rotary: Rotary,
    remat: str,
    collect: bool = False,
    segment_ids: jax.Array | None = None,
):
    """(x, block_state) -> (x, stats or None): one block, optionally rematerialized, shaped
    for scan (stats become [L]-stacked scan outputs)."""

    def body(x, state):
        block = nnx.merge(graphdef, state)
        out = block(x, rotary, collect_stats=collect, segment_ids=segment_ids)
        x, stats = out if collect else (out, None)
        return constrain(x, ("batch", "seq", None)), stats

    if remat == "none":
        return body
    return jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=False)


def stack_layers(blocks: list[Block]) -> Block:
    """One Block whose parameters carry a leading `layers` axis (for `scan_layers`)."""
    graphdef, _ = nnx.split(blocks[0])
    states = [nnx.state(block) for block in blocks]
    return nnx.merge(graphdef, jax.tree.map(lambda *xs: jnp.stack(xs), *states))


class Transformer(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] (float32).

    With `scan_layers` the blocks are one Block with stacked [L, ...] parameters applied by
    `jax.lax.scan` (compile time independent of depth); otherwise a list of L blocks. Both are
    initialized identically for the same seed and apply the same per-block function.
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

    def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
        """An empty KV cache of `max_len` slots (compute dtype unless `dtype` is given)."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch_size, max_len, cfg.kv_heads, cfg.dim_per_head)
        zeros = jnp.zeros(shape, dtype or compute_dtype(cfg))
        return KVCache(
            k=zeros,
            v=zeros,
            valid=jnp.zeros((batch_size, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        collect_stats: bool = False,
        cache: KVCache | None = None,
        valid: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
    ):
        """logits [B, T, V] float32; with `collect_stats` also per-layer telemetry
        {"attn": {name: [L]}, "mlp": {name: [L]}} (see `stream_stats`).

        Decoding: with a KV `cache`, the T tokens are written to slots index..index+T-1 and
        attend to every valid slot up to their own; returns (logits, updated cache). `valid`
        [B, T] marks padding tokens (False) that nothing may attend to; `positions` [B, T] are
        then required (a left-padded row's first real token has position 0).

        Packed sequences: `segment_ids` [B, T] (`attention.document_ids`) keep attention within
        each document, and positions restart at each document's first token."""
        if cache is not None:
            x, rotary = self._embed(tokens, positions)
            return self._decode(x, rotary, cache, valid)
        x, stats = self.hidden(
            tokens, positions, collect_stats=collect_stats, segment_ids=segment_ids
        )
        logits = self._head(x)
        return (logits, stats) if collect_stats else logits

    def loss(
        self,
        tokens: jax.Array,
        targets: jax.Array,
        mask: jax.Array | None = None,
        *,
        collect_stats: bool = False,
        segment_ids: jax.Array | None = None,
    ):
        """(summed next-token cross-entropy, counted positions), with `collect_stats` also the
        per-layer telemetry, for inputs `tokens` [B, T] and their `targets` [B, T]; `mask` [B, T]
        marks the positions that count (None: all); `segment_ids` [B, T] as in `__call__`. The
        output head and the loss run in chunks of `ModelConfig.loss_chunk_len` positions without
        whole-batch logits (`perijax.loss`); the result equals the cross-entropy of the whole
        logits `self(tokens)` (tests/test_loss.py checks it)."""
        x, stats = self.hidden(tokens, collect_stats=collect_stats, segment_ids=segment_ids)
        b, t = tokens.shape
        vocab_first = self.lm_head is None
        w = self.embed[...] if vocab_first else self.lm_head[...]
        chunk = loss_lib.chunk_len_for(self.cfg.loss_chunk_len, b, t, self.cfg.vocab_size)
        out = loss_lib.head_loss(x, w, targets, mask, chunk_len=chunk, vocab_first=vocab_first)
        return (*out, stats) if collect_stats else out

    def _embed(self, tokens: jax.Array, positions, segment_ids=None) -> tuple[jax.Array, Rotary]:
        cfg = self.cfg
        if positions is None and segment_ids is not None:
            positions = attention_lib.document_positions(segment_ids)
        elif positions is None:
            positions = np.arange(tokens.shape[-1])  # static: constant rotary tables
        x = jnp.take(self.embed[...], tokens, axis=0).astype(compute_dtype(cfg))
        x = constrain(x, ("batch", "seq", None))
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        return x, rotary_tables(positions, cfg.dim_per_head, cfg.rope_theta)

    def hidden(
        self,
        tokens: jax.Array,
        positions: jax.Array | None = None,
        *,
        collect_stats: bool = False,
        segment_ids: jax.Array | None = None,
    ):
        """(final hidden states [B, T, D] in the compute dtype, after the final norm; per-layer
        telemetry or None): everything but the output head."""
        cfg = self.cfg
        x, rotary = self._embed(tokens, positions, segment_ids)
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)
            body = _block_fn(graphdef, rotary, cfg.remat, collect_stats, segment_ids)
            x, stats = jax.lax.scan(body, x, state)
        else:
            per_layer = []
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                fn = _block_fn(graphdef, rotary, cfg.remat, collect_stats, segment_ids)
                x, layer_stats = fn(x, state)
                per_layer.append(layer_stats)
            stats = jax.tree.map(lambda *v: jnp.stack(v), *per_layer) if collect_stats else None
        if self.final_norm is not None:
            x = self.final_norm(x)
        return x, stats

    def _head(self, x: jax.Array) -> jax.Array:
        """logits [B, T, V] float32 of final hidden states x."""
        if self.lm_head is None:  # tied: the [V, D] embedding as is (a transposed operand
            # sends XLA:CPU's bfloat16 weight-gradient dot to an unsupported kernel)
            logits = einsum("btd,vd->btv", x, self.embed[...], jnp.float32)
        else:
            logits = einsum("btd,dv->btv", x, self.lm_head[...], jnp.float32)
        return constrain(logits, ("batch", "seq", "vocab"))

    def _decode(self, x: jax.Array, rotary: Rotary, cache: KVCache, valid: jax.Array | None):
        b, t = x.shape[:2]
        if valid is None:
            valid = jnp.ones((b, t), bool)
        slots_valid = jax.lax.dynamic_update_slice(cache.valid, valid, (0, cache.index))
        slots = jnp.arange(cache.valid.shape[1])
        query_slots = cache.index + jnp.arange(t)
        mask = slots_valid[:, None, :] & (slots[None, None, :] <= query_slots[None, :, None])

        def layer(x, block, k, v):
            return block(x, rotary, cache=LayerCache(k, v, mask, cache.index))

        if self.cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(x, xs):
                state, k, v = xs
                x, new = layer(x, nnx.merge(graphdef, state), k, v)
                return x, (new.k, new.v)

            x, (ks, vs) = jax.lax.scan(body, x, (state, cache.k, cache.v))
        else:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                x, new = layer(x, block, cache.k[i], cache.v[i])
                ks.append(new.k)
                vs.append(new.v)
            ks, vs = jnp.stack(ks), jnp.stack(vs)
        new_cache = KVCache(k=ks, v=vs, valid=slots_valid, index=cache.index + t)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self._head(x), new_cache


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model's structure with ShapeDtypeStruct leaves: nothing is allocated."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts without allocating: total, embedding (input + untied output), norms."""
    state = nnx.state(abstract_model(cfg), nnx.Param)
    counts = {"total": 0, "embedding": 0, "norm": 0}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        n = math.prod(leaf.shape)
        keys = [str(getattr(p, "key", getattr(p, "name", p))) for p in path]
        counts["total"] += n
        if keys[0] in ("embed", "lm_head"):
            counts["embedding"] += n
        if any(key.endswith("norm") for key in keys):
            counts["norm"] += n
    counts["non_embedding"] = counts["total"] - counts["embedding"]
    return counts
