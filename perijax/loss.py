"""The language-modelling loss: output head and next-token cross-entropy in one pass, chunked.

`head_loss(x, w, targets)` is `cross_entropy(x @ w, targets)` for the final hidden states x
[B, T, D] and the output head w, without the [B, T, V] float32 logits of the whole batch. The
sequence is cut into chunks of `chunk_len` positions, applied one after another with
`jax.lax.scan`; each chunk's logits [B, chunk_len, V] exist only inside one loop iteration. When
the loss is differentiated, each chunk also computes its gradients right away, as Liger-Kernel's
fused linear cross-entropy does (the softmax is at hand; the logits need not be kept or
recomputed):

    p = softmax(logits),  dlogits = p - onehot(target)    (zero where a position is masked)
    dx = dlogits @ w^T,   dw += x^T @ dlogits             (w as [D, V]; float32 accumulation)

and the backward pass only scales them by the incoming cotangent. Matmuls take the compute dtype
(x's) with float32 accumulation, as `perijax.model.mixed_einsum` does; the softmax statistics are
float32. Without differentiation (eval, scoring) only the loss is computed.

Why: for the paper's models the vocabulary is cl100k_base's 100,277 tokens, and one micro-batch
of 8 x 8,192 tokens has 26 GB of float32 logits, and as much again for their gradient. On CPU the
whole-batch logits of configs/small.py (256 MiB) are read and written several times per step,
and cache-sized chunks avoid that (docs/performance.md, "The output head and loss", has the
timings).

Chunk length: `ModelConfig.loss_chunk_len`; 0 picks `auto_chunk_len`, the longest chunk whose
logits stay within a budget of elements (cache-sized on CPU, 1 GiB of float32 on GPU and TPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from perijax import tuning
from perijax.attention import block_len
from perijax.sharding import constrain, shards

MIN_CHUNK_TOKENS = 256  # below this the matmuls get too thin to run well


def auto_chunk_len(batch: int, seq_len: int, vocab: int, backend: str | None = None) -> int:
    """The longest divisor c of `seq_len` with batch * c * vocab within the backend's budget of
    logits elements, but at least MIN_CHUNK_TOKENS tokens (batch * c) where `seq_len` allows."""
    budget = tuning.current(backend).loss_chunk_budget  # logits elements per chunk
    divisors = [c for c in range(1, seq_len + 1) if seq_len % c == 0]
    fits = [c for c in divisors if batch * c * vocab <= budget]
    best = fits[-1] if fits else 1
    floor = next((c for c in divisors if batch * c >= MIN_CHUNK_TOKENS), seq_len)
    return max(best, floor)


def chunk_len_for(
    setting: int, batch: int, seq_len: int, vocab: int, *, mesh=None, backend: str | None = None
) -> int:
    """The chunk length used for a global [batch, seq_len] input: `setting`, or with 0
    `auto_chunk_len` of one device's part (its rows of the batch and of the vocabulary, as
    `mesh` splits them: default the current abstract mesh) on `backend` (default: JAX's). For
    a `seq_len` that `setting` does not divide (scoring other lengths), its longest divisor up
    to `setting`."""
    if setting <= 0:
        local_batch = batch // shards("batch", batch, mesh)
        local_vocab = vocab // shards("vocab", vocab, mesh)
        return auto_chunk_len(local_batch, seq_len, local_vocab, backend)
    return block_len(seq_len, setting)  # the longest divisor of seq_len up to `setting`


def head_loss(
    x: jax.Array,
    w: jax.Array,
    targets: jax.Array,
    mask: jax.Array | None = None,
    *,
    chunk_len: int,
    vocab_first: bool,
) -> tuple[jax.Array, jax.Array]:
    """(summed next-token cross-entropy in nats, number of counted positions), both float32.

    x: [B, T, D] final hidden states in the compute dtype; w: the output head, [V, D] when
    `vocab_first` (a tied embedding) else [D, V], any float dtype (cast to x's); targets: [B, T]
    int; mask: [B, T] bool, the positions that count (others are selected away, so padding cannot
    leak into the sum), None for all. `chunk_len` must divide T. Gradients flow to x and w."""
    t = x.shape[1]
    if t % chunk_len:
        raise ValueError(f"chunk_len={chunk_len} must divide the sequence length {t}")
    valid = jnp.ones(targets.shape, bool) if mask is None else mask.astype(bool)
    total = _head_loss(x, w, targets, valid, chunk_len, vocab_first)
    return total, jnp.sum(valid, dtype=jnp.float32)


def _specs(vocab_first: bool) -> tuple[str, str, str]:
    """einsum specs of (logits, dx, dw) for the head's layout, on chunks [S, B/S, c, ...] (S:
    batch shards). The weight gradient keeps a per-shard axis s (summed after the loop) and the
    operand order of `perijax.model.mixed_einsum`'s (another order sends XLA:CPU's bfloat16 dot to a
    slow kernel)."""
    if vocab_first:
        return "sbcd,vd->sbcv", "sbcv,vd->sbcd", "sbcd,sbcv->svd"
    return "sbcd,dv->sbcv", "sbcv,dv->sbcd", "sbcd,sbcv->sdv"


def _split(a: jax.Array, shards: int, chunk_len: int) -> jax.Array:
    """[B, T, ...] -> [T / chunk_len, S, B / S, chunk_len, ...]; S = `shards` keeps the batch
    axis's sharding."""
    b, t = a.shape[:2]
    a = a.reshape(shards, b // shards, t // chunk_len, chunk_len, *a.shape[2:])
    return constrain(jnp.moveaxis(a, 2, 0), (None, "batch") + (None,) * (a.ndim - 2))


def _merge(a: jax.Array) -> jax.Array:
    """Inverse of `_split`."""
    n, s, b, c = a.shape[:4]
    return jnp.moveaxis(a, 0, 2).reshape(s * b, n * c, *a.shape[4:])


def _chunk(xc, wc, tc, vc, vocab_first: bool, grads: bool):
    """One chunk [S, B/S, c, ...]: (loss sums per shard [S], and with `grads` (dx [S, B/S, c, D]
    float32, dw per shard [S, ...w's shape] float32))."""
    spec, dx_spec, dw_spec = _specs(vocab_first)
    logits = jnp.einsum(spec, xc, wc, preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", None, "seq", "vocab"))
    m = jnp.max(logits, axis=-1, keepdims=True)
    e = jnp.exp(logits - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    # The target's logit as a masked sum, not a gather: a vocabulary split over devices then
    # needs one small all-reduce instead of gathering the logits.
    onehot = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 3) == tc[..., None]
    target_logit = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
    losses = jnp.log(s[..., 0]) + m[..., 0] - target_logit
    loss = jnp.sum(jnp.where(vc, losses, 0.0), axis=(1, 2))
    if not grads:
        return loss, None
    p = e / s
    dlogits = jnp.where(vc[..., None], jnp.where(onehot, p - 1.0, p), 0.0).astype(xc.dtype)
    dx = jnp.einsum(dx_spec, dlogits, wc, preferred_element_type=jnp.float32)
    dw = jnp.einsum(dw_spec, xc, dlogits, preferred_element_type=jnp.float32)
    w_axes = ("vocab", "embed") if vocab_first else ("embed", "vocab")
    return loss, (dx, constrain(dw, ("batch",) + w_axes))


def _run(x, w, targets, valid, chunk_len: int, vocab_first: bool, grads: bool):
    """Loss sum (and gradients) over all chunks. Losses and the weight gradient are accumulated
    per batch shard ([S, ...], S = the devices the batch is split over) and summed once after the
    loop: summing them inside it would reduce the whole head gradient across devices once per
    chunk instead of once per step."""
    wc = w.astype(x.dtype)
    s = shards("batch", x.shape[0])
    xs, ts, vs = (_split(a, s, chunk_len) for a in (x, targets, valid))
    if xs.shape[0] == 1:
        loss, g = _chunk(xs[0], wc, ts[0], vs[0], vocab_first, grads)
        if g is not None:
            g = (_merge(g[0][None]), jnp.sum(g[1], axis=0))
        return jnp.sum(loss), g

    def body(carry, inputs):
        total, dw = carry
        loss, g = _chunk(inputs[0], wc, inputs[1], inputs[2], vocab_first, grads)
        if g is None:
            return (total + loss, None), None
        return (total + loss, dw + g[1]), g[0]

    zeros = (jnp.zeros((s,), jnp.float32), jnp.zeros((s, *w.shape), jnp.float32) if grads else None)
    (total, dw), dxs = jax.lax.scan(body, zeros, (xs, ts, vs))
    return jnp.sum(total), ((_merge(dxs), jnp.sum(dw, axis=0)) if grads else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _head_loss(x, w, targets, valid, chunk_len, vocab_first):
    return _run(x, w, targets, valid, chunk_len, vocab_first, grads=False)[0]


def _head_loss_fwd(x, w, targets, valid, chunk_len, vocab_first):
    total, (dx, dw) = _run(x, w, targets, valid, chunk_len, vocab_first, grads=True)
    # Empty arrays carry the primal dtypes to the backward pass (residuals must be arrays).
    return total, (dx, dw, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _head_loss_bwd(chunk_len, vocab_first, residuals, g):
    del chunk_len, vocab_first
    dx, dw, x_like, w_like = residuals
    return (dx * g).astype(x_like.dtype), (dw * g).astype(w_like.dtype), None, None


_head_loss.defvjp(_head_loss_fwd, _head_loss_bwd)
