"""Sampling from a trained model with a KV cache: greedy, temperature, top-k and top-p.

    perijax generate runs/tiny/checkpoints/500 --prompt "def main(" --max-new-tokens 64

Prompts of different lengths are left-padded into one batch; padding is masked out of attention
and each row's positions start at 0 at its first real token, so a row decodes as it would alone.
The prompt is processed in one forward pass (prefill) that fills the cache; each new token then
costs one single-token forward pass over the cache, all inside one jitted `lax.fori_loop`.
Lengths are rounded up to multiples of `BUCKET` so that a handful of compiles serve any prompt.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # JAX is imported when generating, not when the command line is parsed
    import jax
    from flax import nnx

    from perijax.model import Transformer

__all__ = ["generate", "sample_logits"]

BUCKET = 32


def sample_logits(
    logits: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float
) -> jax.Array:
    """Next token ids [B] from logits [B, V]: argmax when `temperature` is 0, else a sample from
    softmax(logits / temperature) restricted to the `top_k` most likely tokens (0: all) and to
    the smallest set whose probability reaches `top_p` (1.0: all)."""
    import jax
    import jax.numpy as jnp

    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    floor = jnp.finfo(jnp.float32).min
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, floor, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep a token while the probability of the tokens ranked above it is below top_p
        # (the most likely token is always kept).
        keep = (cum - jax.nn.softmax(sorted_logits, axis=-1)) < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, floor, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _generate(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    tokens: jax.Array,
    pad: jax.Array,
    key: jax.Array,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
) -> jax.Array:
    """tokens [B, P] left-padded by `pad` [B] -> new tokens [B, max_new_tokens]."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    model: Transformer = nnx.merge(graphdef, state)
    b, p = tokens.shape
    slots = jnp.arange(p)
    valid = slots[None, :] >= pad[:, None]
    positions = jnp.maximum(slots[None, :] - pad[:, None], 0)
    model.init_cache(b, p + max_new_tokens)
    logits = model.decode(tokens, positions, valid)
    keys = jax.random.split(key, max_new_tokens)
    first = sample_logits(logits[:, -1], keys[0], temperature, top_k, top_p)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)
    graphdef, cache, rest = nnx.split(model, nnx.Cache, ...)

    def step(i, carry):
        out, cache = carry
        model = nnx.merge(graphdef, cache, rest)
        position = (p - pad + i - 1)[:, None]  # the previous token's position
        previous = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
        logits = model.decode(previous, position)
        token = sample_logits(logits[:, -1], keys[i], temperature, top_k, top_p)
        return out.at[:, i].set(token), nnx.state(model, nnx.Cache)

    out, _ = jax.lax.fori_loop(1, max_new_tokens, step, (out, cache))
    return out


@functools.cache
def _jitted_generate():
    import jax

    from perijax.tuning import compiler_options

    return jax.jit(_generate, static_argnums=(0, 5, 6, 7, 8), compiler_options=compiler_options())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop_tokens: Sequence[int] = (),
) -> list[list[int]]:
    """New token ids for each prompt (at most `max_new_tokens`, cut after the first stop token,
    which is kept). Greedy when `temperature` is 0. Deterministic for a given `seed`.

    Raises:
      ValueError: an empty prompt, a non-positive `max_new_tokens`, or bad sampling settings.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if temperature < 0 or top_k < 0 or not 0.0 < top_p <= 1.0:
        raise ValueError(
            f"need temperature >= 0, top_k >= 0 and 0 < top_p <= 1 (got {temperature}, "
            f"{top_k}, {top_p})"
        )
    vocab = model.cfg.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    longest = max(len(p) for p in prompts)
    width = _round_up(longest, BUCKET)
    tokens = np.zeros((len(prompts), width), np.int32)
    pad = np.zeros((len(prompts),), np.int32)
    for row, prompt in enumerate(prompts):
        pad[row] = width - len(prompt)
        tokens[row, pad[row] :] = prompt
    import jax
    import jax.numpy as jnp
    from flax import nnx

    steps = _round_up(max_new_tokens, BUCKET)
    graphdef, state = nnx.split(model)
    out = _jitted_generate()(
        graphdef,
        state,
        jnp.asarray(tokens),
        jnp.asarray(pad),
        jax.random.key(seed),
        steps,
        float(temperature),
        int(top_k),
        float(top_p),
    )
    results = []
    stops = set(int(t) for t in stop_tokens)
    for row in np.asarray(jax.device_get(out))[:, :max_new_tokens].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        results.append(row[:cut])
    return results


# ------------------------------------------------------------------------------------- command
