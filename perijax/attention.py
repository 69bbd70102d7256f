"""Causal self-attention kernels: one entry point (`attend`), one implementation per backend.

Every implementation computes the same function, softmax(q k^T / sqrt(Dh) + mask) v, for
q [B, T, H, Dh] and k, v [B, S, K, Dh] with grouped-query attention (query head h reads kv head
h // (H / K), as Hugging Face does) and returns [B, T, H, Dh]. The mask is causal, AND-ed with
"same document" when `segment_ids` [B, T] are given (packed sequences, `data.document_masking`),
or an explicit [B, T, S] mask (decoding with a KV cache). Matmuls take the compute dtype with
float32 accumulation; the softmax is float32.

`model.attention` picks the implementation:

- `auto` (the default): `cudnn` on GPU, `splash` on TPU, `xla` on CPU.
- `xla` (any backend): `softmax_attention`, the [B, H, T, S] scores materialized.
- `blockwise` (any backend): `blockwise_attention`, FlashAttention-2's algorithm in plain JAX
  (query and key blocks, online softmax, recomputation in the backward pass): memory linear in T.
- `cudnn` (NVIDIA GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, GQA native.
- `splash` (TPU): Pallas splash attention, GQA and segment ids native, per shard under
  `shard_map`.

A fused kernel that cannot serve a call falls back, with a one-time note on stderr: decoding
masks take the `xla` path (short queries against a cache); a training-shaped call that cuDNN or
splash cannot take (document masking on cuDNN, a head dim cuDNN does not support, a sequence
length splash cannot tile, kv heads that the tensor axis does not divide) takes `blockwise`, whose
memory behaves like the fused kernels', instead of materializing T x T scores.
"""

from __future__ import annotations

import functools
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np

from perijax import tuning
from perijax.config import ConfigError

# The kernels `auto` chooses per backend; everything else runs the XLA path.
AUTO = {"gpu": "cudnn", "tpu": "splash"}
BACKEND_OF = {"cudnn": ("gpu", "an NVIDIA GPU"), "splash": ("tpu", "a TPU")}
MAX_BLOCK = 512  # query/key block of the blockwise and splash kernels

_noted: set[str] = set()


def resolve(impl: str, backend: str | None = None) -> str:
    """The implementation `impl` names on `backend` (default: the one traced for,
    `perijax.tuning.backend()`): `auto` becomes the backend's fused kernel, or `xla` on CPU."""
    if impl != "auto":
        return impl
    return AUTO.get(backend or tuning.backend(), "xla")


def check(impl: str, compute_dtype, backend: str | None = None) -> None:
    """Fails early (ConfigError) when an explicitly chosen kernel cannot run on `backend`
    (default: the one traced for, `perijax.tuning.backend()`)."""
    backend = backend or tuning.backend()
    needs = BACKEND_OF.get(impl)
    if needs and backend != needs[0]:
        raise ConfigError(
            f"model.attention={impl} needs {needs[1]}, but the backend is {backend}: "
            "use model.attention=auto (or xla, blockwise)"
        )
    if impl == "cudnn" and jnp.dtype(compute_dtype) == jnp.float32:
        raise ConfigError(
            "model.attention=cudnn needs model.dtype=bfloat16 (the default on GPU) or float16: "
            "set one of them or model.attention=blockwise"
        )


def describe(impl: str, backend: str | None = None) -> str:
    """One phrase for the start-up log: which kernel runs and why."""
    chosen = resolve(impl, backend)
    return f"{chosen} (auto on {backend or tuning.backend()})" if impl == "auto" else chosen


def note_once(message: str) -> None:
    """Prints `message` to stderr the first time it is seen in this process."""
    if message not in _noted:
        _noted.add(message)
        print(f"perijax: note: {message}", file=sys.stderr, flush=True)


def attend(
    impl: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Causal attention with implementation `impl` (`model.attention`, resolved here).

    q: [B, T, H, Dh]; k, v: [B, S, K, Dh]; segment_ids: [B, T] document ids (S = T; equal ids
    may attend to each other); mask: [B, T, S] (True = may attend), replacing the causal mask
    (decoding). Returns [B, T, H, Dh] in q's dtype."""
    impl = resolve(impl)
    if mask is not None:
        if impl != "xla":
            note_once(f"{impl} attention takes no explicit mask: decoding uses the xla path")
        return xla_attention(q, k, v, _grouped_mask(mask))
    why_not = _unsupported(impl, q, k, segment_ids)
    if why_not:
        note_once(f"{impl} attention {why_not}: using blockwise attention instead")
        impl = "blockwise"
    match impl:
        case "cudnn":
            return cudnn_attention(q, k, v)
        case "splash":
            return splash_attention(q, k, v, segment_ids)
        case "blockwise":
            return blockwise_attention(q, k, v, segment_ids)
    return xla_attention(q, k, v, causal_mask(segment_ids, q.shape[1]))


def _unsupported(impl: str, q: jax.Array, k: jax.Array, segment_ids) -> str | None:
    """Why the fused kernel `impl` cannot take this call (None: it can)."""
    t, dh = q.shape[1], q.shape[-1]
    if impl == "cudnn":
        if segment_ids is not None:
            # jax.nn.dot_product_attention exposes padding lengths, not packed documents.
            return "has no document masking in jax.nn.dot_product_attention"
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            return f"needs bfloat16 or float16 inputs, not {q.dtype}"
        if dh % 8 or dh > 128:
            return f"does not support head dim {dh} (a multiple of 8, at most 128)"
    if impl == "splash":
        if t % 128:
            return f"needs a sequence length divisible by 128, not {t}"
        mesh = jax.sharding.get_abstract_mesh()
        tensor = 1 if mesh.empty or "tensor" not in mesh.axis_names else mesh.shape["tensor"]
        if k.shape[2] % tensor:
            return f"needs kv heads ({k.shape[2]}) divisible by the tensor axis ({tensor})"
    return None


def document_ids(tokens: jax.Array, eod_id: int) -> jax.Array:
    """Segment ids [..., T] of a packed row of tokens in which every document ends with
    `eod_id`: documents numbered from 1 at the row's start, the end-of-document token belonging
    to the document it ends (as the loader's `PackedWindows(segment_ids=True)` numbers them)."""
    ends = (tokens == eod_id).astype(jnp.int32)
    return jnp.cumsum(ends, axis=-1) - ends + 1


def document_positions(segment_ids: jax.Array) -> jax.Array:
    """Positions [B, T] that restart at 0 at each document's first token."""
    t = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[..., :1], bool), segment_ids[..., 1:] != segment_ids[..., :-1]],
        axis=-1,
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=segment_ids.ndim - 1)


def causal_mask(segment_ids: jax.Array | None, t: int):
    """[T, T] (a host constant) or [B, 1, 1, T, T] (with documents): True where query i may
    attend to key j, broadcastable to the grouped scores [B, K, G, T, S]."""
    causal = np.tril(np.ones((t, t), dtype=bool))
    if segment_ids is None:
        return causal
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal & same)[:, None, None]


def _grouped_mask(mask: jax.Array) -> jax.Array:
    return mask[:, None, None]  # [B, T, S] -> [B, 1, 1, T, S]


def _group(q: jax.Array, kv_heads: int) -> jax.Array:
    """[B, T, H, Dh] -> [B, T, K, G, Dh] with h = k * G + g."""
    b, t, h, dh = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, dh)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask) -> jax.Array:
    """The XLA path: softmax attention over grouped heads; mask broadcasts to [B, K, G, T, S].
    Its backward pass is `softmax_attention`'s written-out one where `perijax.tuning` says so
    (CPU), autodiff of the same forward pass elsewhere."""
    written_out = tuning.current().written_out_attention_backward  # the one backend switch
    fn = softmax_attention if written_out else _softmax_attention_autodiff
    out = fn(_group(q, k.shape[2]), k, v, mask)
    return out.reshape(q.shape)


@jax.custom_vjp
def softmax_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """softmax(mask(q k^T / sqrt(Dh))) v for q [B, T, K, G, Dh] and k, v [B, S, K, Dh], all in the
    compute dtype; mask (True = may attend) broadcasts to [B, K, G, T, S]. The matmuls take
    compute-dtype inputs and accumulate in float32; the softmax is float32.

    The backward pass is written out, as FlashAttention's is: it keeps the probabilities in the
    compute dtype (autodiff kept them in float32 as well) and the float32 output o, and takes
    rowsum(p * dp) as rowsum(do * o), a sum over Dh instead of over S (equal, since o = p v).
    The probabilities of masked pairs are exactly 0, so their gradients are too."""
    return _softmax_attention_fwd(q, k, v, mask)[0]


def _softmax_attention_fwd(q, k, v, mask):
    f32 = jnp.float32
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=f32)
    logits = jnp.where(mask, logits / math.sqrt(q.shape[-1]), jnp.finfo(f32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=f32)
    return out.astype(q.dtype), (q, k, v, probs, out)


def _softmax_attention_bwd(residuals, g):
    q, k, v, probs, out = residuals
    f32 = jnp.float32
    g = g.astype(q.dtype)
    dv = jnp.einsum("bkgts,btkgd->bskd", probs, g, preferred_element_type=f32)
    dp = jnp.einsum("btkgd,bskd->bkgts", g, v, preferred_element_type=f32)
    # rowsum(p * dp) over S = rowsum(g * out) over Dh: [B, T, K, G] -> [B, K, G, T, 1].
    delta = jnp.sum(g.astype(f32) * out, axis=-1).transpose(0, 2, 3, 1)[..., None]
    ds = (probs.astype(f32) * (dp - delta) / math.sqrt(q.shape[-1])).astype(q.dtype)
    dq = jnp.einsum("bkgts,bskd->btkgd", ds, k, preferred_element_type=f32)
    dk = jnp.einsum("bkgts,btkgd->bskd", ds, q, preferred_element_type=f32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _softmax_attention_autodiff(q, k, v, mask):
    return _softmax_attention_fwd(q, k, v, mask)[0]


# --- blockwise: FlashAttention-2 (Dao, arXiv 2307.08691) in plain JAX ----------------------------


def block_len(t: int, most: int = MAX_BLOCK) -> int:
    """The longest divisor of t that is at most `most`."""
    return max(c for c in range(1, min(t, most) + 1) if t % c == 0)


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    block_q: int | None = None,
    block_kv: int | None = None,
) -> jax.Array:
    """Causal attention computed one [block_q x block_kv] tile at a time: q [B, T, H, Dh],
    k, v [B, T, K, Dh] -> [B, T, H, Dh]; segment_ids [B, T] or None.

    The forward pass keeps a running maximum and sum per query (online softmax) and saves only
    the output and the log-sum-exp; the backward pass recomputes each tile's probabilities.
    Tiles above the diagonal are skipped. Peak memory is O(T) per head instead of O(T^2), as
    with cuDNN's and splash's fused kernels, so `perijax plan` compiles this path in place of
    theirs (docs/scaling.md). Default blocks: the longest divisors of T up to 512."""
    t = q.shape[1]
    bq = block_q or block_len(t)
    bk = block_kv or block_len(t)
    if t % bq or t % bk or k.shape[1] != t:
        raise ValueError(f"blocks {bq}, {bk} must divide the sequence length {t} (self-attention)")
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    out = _flash(_group(q, k.shape[2]), k, v, seg, bq, bk)
    return out.reshape(q.shape)


def _tile_mask(seg, i0, j0, bq, bk):
    """[B or 1, 1, 1, bq, bk] True where query i0 + a may attend to key j0 + c (seg: [B, T]
    document ids, or None: causal only)."""
    qi = i0 + jnp.arange(bq)[:, None]
    kj = j0 + jnp.arange(bk)[None, :]
    if seg is None:
        return (qi >= kj)[None, None, None]
    sq = jax.lax.dynamic_slice_in_dim(seg, i0, bq, axis=1)
    sk = jax.lax.dynamic_slice_in_dim(seg, j0, bk, axis=1)
    return ((qi >= kj)[None] & (sq[:, :, None] == sk[:, None, :]))[:, None, None]


def _tile_scores(q_blk, k_blk, scale):
    """[B, K, G, bq, bk] float32 scores of a query block [B, bq, K, G, Dh] and a key block."""
    s = jnp.einsum("btkgd,bskd->bkgts", q_blk, k_blk, preferred_element_type=jnp.float32)
    return s * scale


def _flash_forward(q, k, v, seg, bq, bk):
    """(out [B, T, K, G, Dh] float32, lse [B, K, G, T] float32)."""
    b, t, kh, g, dh = q.shape
    f32, scale = jnp.float32, 1.0 / math.sqrt(dh)
    neg = jnp.finfo(f32).min

    def q_block(_, i):
        i0 = i * bq
        q_blk = jax.lax.dynamic_slice_in_dim(q, i0, bq, axis=1)

        def kv_block(j, carry):
            m, denom, acc = carry
            j0 = j * bk
            k_blk = jax.lax.dynamic_slice_in_dim(k, j0, bk, axis=1)
            v_blk = jax.lax.dynamic_slice_in_dim(v, j0, bk, axis=1)
            mask = _tile_mask(seg, i0, j0, bq, bk)
            s = jnp.where(mask, _tile_scores(q_blk, k_blk, scale), neg)
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            denom = denom * corr + p.sum(-1)
            pv = jnp.einsum(
                "bkgts,bskd->bkgtd", p.astype(q.dtype), v_blk, preferred_element_type=f32
            )
            return m_new, denom, acc * corr[..., None] + pv

        init = (
            jnp.full((b, kh, g, bq), neg, f32),
            jnp.zeros((b, kh, g, bq), f32),
            jnp.zeros((b, kh, g, bq, dh), f32),
        )
        last = (i0 + bq - 1) // bk + 1  # key blocks at or below the diagonal
        m, denom, acc = jax.lax.fori_loop(0, last, kv_block, init)
        out = acc / denom[..., None]
        return None, (out.transpose(0, 3, 1, 2, 4), m + jnp.log(denom))

    _, (out, lse) = jax.lax.scan(q_block, None, jnp.arange(t // bq))
    # [nq, B, bq, K, G, Dh] -> [B, T, K, G, Dh]; [nq, B, K, G, bq] -> [B, K, G, T]
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, kh, g, dh)
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, t)
    return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, seg, bq, bk):
    """[B, T, K, G, Dh] attention output in q's dtype (custom VJP: `_flash_bwd`)."""
    return _flash_forward(q, k, v, seg, bq, bk)[0].astype(q.dtype)


def _flash_fwd(q, k, v, seg, bq, bk):
    out, lse = _flash_forward(q, k, v, seg, bq, bk)
    return out.astype(q.dtype), (q, k, v, seg, out, lse)


def _flash_bwd(bq, bk, residuals, g):
    q, k, v, seg, out, lse = residuals
    b, t, kh, gr, dh = q.shape
    f32, scale = jnp.float32, 1.0 / math.sqrt(dh)
    g = g.astype(q.dtype)
    # delta_i = rowsum(dO_i * O_i): [B, K, G, T]
    delta = jnp.einsum("btkgd,btkgd->bkgt", g.astype(f32), out)

    def kv_block(dq, j):
        j0 = j * bk
        k_blk = jax.lax.dynamic_slice_in_dim(k, j0, bk, axis=1)
        v_blk = jax.lax.dynamic_slice_in_dim(v, j0, bk, axis=1)

        def q_block(i, carry):
            dq, dk, dv = carry
            i0 = i * bq
            q_blk = jax.lax.dynamic_slice_in_dim(q, i0, bq, axis=1)
            g_blk = jax.lax.dynamic_slice_in_dim(g, i0, bq, axis=1)
            lse_blk = jax.lax.dynamic_slice_in_dim(lse, i0, bq, axis=3)
            d_blk = jax.lax.dynamic_slice_in_dim(delta, i0, bq, axis=3)
            mask = _tile_mask(seg, i0, j0, bq, bk)
            s = _tile_scores(q_blk, k_blk, scale)
            p = jnp.where(mask, jnp.exp(s - lse_blk[..., None]), 0.0)
            pc = p.astype(q.dtype)
            dv = dv + jnp.einsum("bkgts,btkgd->bskd", pc, g_blk, preferred_element_type=f32)
            dp = jnp.einsum("btkgd,bskd->bkgts", g_blk, v_blk, preferred_element_type=f32)
            ds = (p * (dp - d_blk[..., None]) * scale).astype(q.dtype)
            dq_blk = jnp.einsum("bkgts,bskd->btkgd", ds, k_blk, preferred_element_type=f32)
            dq = jax.lax.dynamic_update_slice_in_dim(
                dq, jax.lax.dynamic_slice_in_dim(dq, i0, bq, axis=1) + dq_blk, i0, axis=1
            )
            dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, q_blk, preferred_element_type=f32)
            return dq, dk, dv

        zeros = jnp.zeros((b, bk, kh, dh), f32)
        first = j0 // bq  # query blocks at or below the diagonal
        dq, dk, dv = jax.lax.fori_loop(first, t // bq, q_block, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(kv_block, jnp.zeros(q.shape, f32), jnp.arange(t // bk))
    # [nk, B, bk, K, Dh] -> [B, T, K, Dh]
    dk, dv = (jnp.moveaxis(x, 0, 1).reshape(k.shape) for x in (dk, dv))
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --- fused kernels ------------------------------------------------------------------------------


def cudnn_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "cudnn"
) -> jax.Array:
    """cuDNN flash attention through `jax.nn.dot_product_attention`: q [B, T, H, Dh], k, v
    [B, S, K, Dh] in JAX's own [batch, seq, heads, head_dim] layout, grouped-query attention
    passed as is (no repeat of K/V; JAX requires H to be a multiple of K, and maps query head h
    to kv head h // (H / K)). `implementation="xla"` runs the same call through XLA (tests)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def splash_block_sizes(t: int):
    """Splash tiles for a sequence of length t: the longest divisor of t up to 512 for every
    forward and backward block (MaxText's defaults are 512 throughout)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    c = block_len(t)
    return sk.BlockSizes(
        block_q=c,
        block_kv=c,
        block_kv_compute=c,
        block_q_dkv=c,
        block_kv_dkv=c,
        block_kv_dkv_compute=c,
        block_q_dq=c,
        block_kv_dq=c,
    )


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
    *,
    interpret: bool | None = None,
) -> jax.Array:
    """TPU Pallas splash attention, causal, with grouped-query heads passed natively (the kernel
    maps query head h to kv head h // (H / K); no K/V copies) and segment ids for document
    masking. Runs per shard under `shard_map` when a mesh is set: batch over data x fsdp, heads
    over tensor. `interpret` (default: unless tracing for a TPU, `perijax.tuning.backend()`, so a
    TPU program compiled from a CPU host holds the real Mosaic kernel) runs the Pallas kernel in
    interpret mode, which works on CPU (tests)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    from perijax.sharding import logical_to_spec

    t, dh = q.shape[1], q.shape[-1]
    if interpret is None:
        interpret = tuning.backend() != "tpu"
    mesh = jax.sharding.get_abstract_mesh()
    mesh = None if mesh.empty else mesh
    # Segment ids only with documents: without them the kernel masks by causality alone.
    segs = () if segment_ids is None else (segment_ids.astype(jnp.int32),)

    def kernel(q, k, v, *seg):  # one shard: q [b, H, T, Dh], k, v [b, K, S, Dh], seg [b, T]
        mask = sm.MultiHeadMask([sm.CausalMask((t, t))] * q.shape[1])
        fn = sk.make_splash_mha(
            mask,
            block_sizes=splash_block_sizes(t),
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )

        def one(q, k, v, *s):
            return fn(q, k, v, segment_ids=sk.SegmentIds(q=s[0], kv=s[0]) if s else None)

        return jax.vmap(one)(q * (1.0 / math.sqrt(dh)), k, v, *seg)

    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    if mesh is not None:
        spec = logical_to_spec(("batch", "heads", "seq", "kv"), mesh)
        seg_spec = logical_to_spec(("batch", "seq"), mesh)
        # check_vma=False: the Pallas call declares no per-axis variance of its outputs.
        kernel = jax.shard_map(
            kernel,
            mesh=mesh,
            in_specs=(spec, spec, spec) + (seg_spec,) * len(segs),
            out_specs=spec,
            check_vma=False,
        )
    return kernel(q, k, v, *segs).transpose(0, 2, 1, 3)
