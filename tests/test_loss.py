"""perijax.loss: the chunked output head + cross-entropy equals the plain formula (loss and
gradients, every layout, mask and chunk length), keeps no whole-batch logits, and picks its chunk
length as documented."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from perijax.config import ConfigError, ModelConfig
from perijax.loss import auto_chunk_len, chunk_len_for, head_loss
from perijax.model import Transformer, mixed_einsum
from perijax.sharding import MESH_AXES

B, T, D, V = 3, 8, 16, 97


def cross_entropy(logits, targets, mask=None):
    """The reference loss: summed next-token cross-entropy of whole [B, T, V] logits (float32)
    and the count of positions that count (`mask`)."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return losses.sum(), jnp.asarray(losses.size, jnp.float32)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask, dtype=jnp.float32)


def _inputs(dtype=jnp.float32, vocab_first=True, seed=0):
    kx, kw, kt, km = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (B, T, D), jnp.float32).astype(dtype)
    w = jax.random.normal(kw, (V, D) if vocab_first else (D, V), jnp.float32)
    targets = jax.random.randint(kt, (B, T), 0, V)
    mask = jax.random.bernoulli(km, 0.7, (B, T))
    return x, w, targets, mask


def _plain(x, w, targets, mask, vocab_first):
    spec = "btd,vd->btv" if vocab_first else "btd,dv->btv"
    return cross_entropy(mixed_einsum(spec, x, w, jnp.float32), targets, mask)


def _mean_and_grads(fn, x, w):
    def mean(x, w):
        total, count = fn(x, w)
        return total / count

    return jax.jit(jax.value_and_grad(mean, argnums=(0, 1)))(x, w)


@pytest.mark.parametrize("vocab_first", [True, False])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("chunk_len", [T, 2, 1])
def test_head_loss_equals_cross_entropy_of_the_logits(vocab_first, masked, chunk_len):
    x, w, targets, mask = _inputs(vocab_first=vocab_first)
    mask = mask if masked else None
    ours = _mean_and_grads(
        lambda x, w: head_loss(x, w, targets, mask, chunk_len=chunk_len, vocab_first=vocab_first),
        x,
        w,
    )
    plain = _mean_and_grads(lambda x, w: _plain(x, w, targets, mask, vocab_first), x, w)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-6)
    for a, b in zip(ours[1], plain[1], strict=True):
        assert a.dtype == b.dtype == jnp.float32
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    total, count = head_loss(x, w, targets, mask, chunk_len=chunk_len, vocab_first=vocab_first)
    assert float(count) == (B * T if mask is None else int(mask.sum()))


def test_masked_positions_cannot_leak():
    """A masked position's target and hidden state change nothing: not the loss, not w's
    gradient, and its own input gradient is zero (selected away, so even inf does not leak)."""
    x, w, targets, mask = _inputs()
    mask = mask.at[0, 3].set(False)
    fn = jax.jit(jax.value_and_grad(
        lambda x, w, t: head_loss(x, w, t, mask, chunk_len=2, vocab_first=True)[0], (0, 1)
    ))  # fmt: skip
    base = fn(x, w, targets)
    changed = fn(x.at[0, 3].set(1e4), w, targets.at[0, 3].set(5))
    np.testing.assert_array_equal(base[0], changed[0])
    np.testing.assert_array_equal(base[1][1], changed[1][1])
    assert not np.any(base[1][0][0, 3])


def test_bfloat16_head_loss_matches_the_einsum_path():
    """bfloat16 hidden states, float32 head: the same matmul precision as
    perijax.model.mixed_einsum's (bfloat16 inputs, float32 accumulation); gradients come back in
    the inputs' dtypes."""
    x, w, targets, _ = _inputs(jnp.bfloat16)
    ours = _mean_and_grads(
        lambda x, w: head_loss(x, w, targets, chunk_len=2, vocab_first=True), x, w
    )
    plain = _mean_and_grads(lambda x, w: _plain(x, w, targets, None, True), x, w)
    np.testing.assert_allclose(ours[0], plain[0], rtol=1e-5)
    assert ours[1][0].dtype == jnp.bfloat16 and ours[1][1].dtype == jnp.float32
    for a, b in zip(ours[1], plain[1], strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-2 * np.abs(b).max())


def _shapes(hlo: str) -> set[str]:
    """The float32 array shapes of an HLO text, leading axes of size 1 dropped."""
    return {re.sub(r"\[(1,)+", "[", a) for a in re.findall(r"f32\[[0-9,]+\]", hlo)}


def test_no_whole_batch_logits_when_chunked():
    """Compiled training gradient: with chunks of 2 positions only [B, 2, V] float32 logits
    exist; with one chunk the whole [B, T, V] array does."""
    x, w, targets, _ = _inputs(jnp.bfloat16)

    def hlo(chunk_len):
        fn = jax.grad(lambda x, w: head_loss(x, w, targets, chunk_len=chunk_len,
                                             vocab_first=True)[0], (0, 1))  # fmt: skip
        return jax.jit(fn).lower(x, w).compile().as_text()

    chunked, whole = _shapes(hlo(2)), _shapes(hlo(T))
    assert f"f32[{B},2,{V}]" in chunked and f"f32[{B},{T},{V}]" not in chunked
    assert f"f32[{B},{T},{V}]" in whole


def test_loss_without_gradient_computes_only_the_logits():
    """Eval: one matmul per chunk (the logits); under differentiation, three."""
    x, w, targets, _ = _inputs(jnp.bfloat16)

    def dots(fn):
        return jax.jit(fn).lower(x, w).as_text().count("dot_general")

    def loss(x, w):
        return head_loss(x, w, targets, chunk_len=2, vocab_first=True)[0]

    assert dots(loss) == 1
    assert dots(jax.grad(loss, (0, 1))) == 3


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_model_loss_equals_cross_entropy_of_its_logits(tie, placement):
    """Transformer.loss (chunked) = cross_entropy(Transformer(tokens)): loss and the gradients of
    every parameter."""
    cfg = ModelConfig(
        vocab_size=V, num_layers=2, d_model=32, num_heads=4, d_ff=48, dtype="float32",
        ln_placement=placement, tie_embeddings=tie, loss_chunk_len=2,
    )  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))
    tokens = jax.random.randint(jax.random.key(3), (B, T + 1), 0, V)

    def ours(params):
        out = nnx.merge(graphdef, params).loss(tokens[:, :-1], tokens[:, 1:])
        return out.total / out.count

    def plain(params):
        logits = nnx.merge(graphdef, params)(tokens[:, :-1])
        total, count = cross_entropy(logits, tokens[:, 1:])
        return total / count

    l1, g1 = jax.jit(jax.value_and_grad(ours))(params)
    l2, g2 = jax.jit(jax.value_and_grad(plain))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_auto_chunk_len():
    # configs/small.py on CPU: 32 x 16 positions x 8192 = 2^22 logits, the budget.
    assert auto_chunk_len(32, 256, 8192, backend="cpu") == 16
    # A large vocabulary would give 1 position; the floor keeps 256 tokens per chunk.
    assert auto_chunk_len(32, 256, 100_277, backend="cpu") == 8
    # Accelerators: 1 GiB of float32 logits. The paper's vocabulary, 8 x 8192 tokens.
    assert auto_chunk_len(8, 8192, 100_277, backend="gpu") == 256
    # Everything fits: one chunk.
    assert auto_chunk_len(2, 16, 64, backend="cpu") == 16
    # The floor never exceeds the sequence.
    assert auto_chunk_len(1, 100, 10**7, backend="cpu") == 100


def test_chunk_len_for_other_lengths():
    assert chunk_len_for(16, 4, 256, 8192) == 16
    assert chunk_len_for(16, 4, 100, 8192) == 10  # the longest divisor of 100 up to 16
    assert chunk_len_for(16, 4, 7, 8192) == 7
    assert chunk_len_for(0, 32, 256, 8192) == auto_chunk_len(32, 256, 8192)


def test_head_loss_refuses_a_chunk_that_does_not_divide():
    x, w, targets, _ = _inputs()
    with pytest.raises(ValueError, match="chunk_len=3 must divide the sequence length 8"):
        head_loss(x, w, targets, chunk_len=3, vocab_first=True)


@pytest.mark.parametrize("value", [-1, 24])
def test_config_refuses_a_bad_chunk_length(value):
    from perijax.config import Config, validate

    cfg = Config()
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, loss_chunk_len=value),
        data=dataclasses.replace(cfg.data, seq_len=128),
    )
    with pytest.raises(ConfigError, match=f"model.loss_chunk_len={value} must divide"):
        validate(cfg)


def _computations(hlo: str) -> dict[str, str]:
    parts = re.split(r"\n(?=[%A-Za-z].*\{\s*$)", hlo, flags=re.M)
    return {re.match(r"(?:ENTRY )?%?([\w.\-]+)", p.strip()).group(1): p for p in parts}


@pytest.mark.parametrize("vocab_first", [True, False])
def test_head_gradient_is_reduced_across_devices_once(vocab_first):
    """Batch over fsdp=4, vocabulary over tensor=2, 4 chunks: the chunk loop's collectives are
    the vocabulary-parallel ones only (softmax statistics, dx); the weight gradient is summed
    over the batch shards once, after the loop, and equals one device's."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    mesh = jax.make_mesh((1, 4, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    b, t, v = 8, 8, 96
    kx, kw, kt = jax.random.split(jax.random.key(5), 3)
    x = jax.random.normal(kx, (b, t, D), jnp.float32)
    w = jax.random.normal(kw, (v, D) if vocab_first else (D, v), jnp.float32)
    targets = jax.random.randint(kt, (b, t), 0, v)

    def grads(x, w):
        fn = lambda x, w: head_loss(x, w, targets, chunk_len=2, vocab_first=vocab_first)[0]  # noqa: E731
        return jax.grad(fn, (0, 1))(x, w)

    expected = jax.jit(grads)(x, w)
    w_spec = PartitionSpec("tensor", "fsdp") if vocab_first else PartitionSpec("fsdp", "tensor")
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("fsdp")))
        ws = jax.device_put(w, NamedSharding(mesh, w_spec))
        step = jax.jit(grads)
        hlo = step.lower(xs, ws).compile().as_text()
        got = step(xs, ws)
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)

    # Per device and chunk: 2 rows x 2 positions of D hidden values. The head gradient's shard
    # (48 x 4) and the chunk's logits (2 x 2 x 48) are larger; neither may cross devices in it.
    chunk_values = (b // 4) * 2 * D
    comps = _computations(hlo)
    bodies = re.findall(r"\bwhile\(.*?body=%?([\w.\-]+)", hlo)
    assert bodies, "the chunks run in a loop"
    for body in bodies:
        collectives = re.findall(
            r"= (.*?) (?:all-reduce|reduce-scatter|all-gather|all-to-all)(?:-start)?\(",
            comps[body],
        )
        assert collectives, "vocabulary parallelism needs its all-reduces in the loop"
        for shapes in collectives:
            for dims in re.findall(r"\[([0-9,]*)\]", shapes):
                size = int(np.prod([int(d) for d in dims.split(",") if d]))
                assert size <= chunk_values, shapes
