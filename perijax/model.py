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

import math

import jax
import jax.numpy as jnp
from flax import nnx

from perijax.config import ModelConfig
from perijax.norms import NORM_ROLES, Norm, residual

__all__ = ["ModelConfig", "Transformer", "Block", "Attention", "Mlp", "count_params"]


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """Resolves `dtype="auto"`: bfloat16 on accelerators, float32 on CPU (where XLA's bfloat16
    dots are no faster, JAX_NOTES.md section 6)."""
    if cfg.dtype == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return jnp.dtype(cfg.dtype)


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


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotating dims (i, i + Dh/2) as Llama does. x: [B, T, N, Dh]; positions:
    [T] or [B, T]. Computed in float32."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle = positions.astype(jnp.float32)[..., None] * freq  # [..., T, Dh/2]
    angle = jnp.broadcast_to(angle, x.shape[:2] + (half,))[:, :, None, :]
    sin, cos = jnp.sin(angle), jnp.cos(angle)
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

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        cfg, dtype = self.cfg, x.dtype
        b, t, _ = x.shape
        h, k, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dtype))
        kk = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dtype))
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dtype))
        if cfg.qk_norm == "per_head":
            q, kk = self.q_norm(q), self.k_norm(kk)
        elif cfg.qk_norm == "full":
            q = self.q_norm(q.reshape(b, t, h * dh)).reshape(b, t, h, dh)
            kk = self.k_norm(kk.reshape(b, t, k * dh)).reshape(b, t, k, dh)
        q, kk = rope(q, positions, cfg.rope_theta), rope(kk, positions, cfg.rope_theta)

        # Grouped query heads: [B, T, K, G, Dh] with h = kv * G + g.
        q = q.reshape(b, t, k, h // k, dh)
        logits = jnp.einsum(
            "btkgd,bskd->bkgts", q, kk, preferred_element_type=jnp.float32
        ) / math.sqrt(dh)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)
        return jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dtype))


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
        dtype = x.dtype
        gate = jnp.einsum("btd,df->btf", x, self.w_gate[...].astype(dtype))
        up = jnp.einsum("btd,df->btf", x, self.w_up[...].astype(dtype))
        return jnp.einsum("btf,fd->btd", jax.nn.silu(gate) * up, self.w_down[...].astype(dtype))


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

    def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
        """x: [B, T, D] residual stream -> [B, T, D]."""
        x = residual(self.placement, x, lambda h: self.attn(h, positions), **self._norms("attn"))
        x = residual(self.placement, x, self.mlp, **self._norms("mlp"))
        return x


class Transformer(nnx.Module):
    """Token ids [B, T] -> next-token logits [B, T, V] (float32)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        pd = jnp.dtype(cfg.param_dtype)
        self.embed = _param(
            rngs, cfg.init_std, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), pd
        )
        self.embed_norm = _norm(cfg) if cfg.embed_norm else None
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = _norm(cfg) if cfg.final_norm else None
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else _param(rngs, cfg.init_std, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), pd)
        )

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
        dtype = compute_dtype(self.cfg)
        if positions is None:
            positions = jnp.arange(tokens.shape[-1])
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        for block in self.blocks:
            x = block(x, positions)
        if self.final_norm is not None:
            x = self.final_norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return jnp.einsum("btd,dv->btv", x, head.astype(dtype), preferred_element_type=jnp.float32)


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
