"""Attention kernels (perijax/attention.py) against the XLA path, and document masking.

Every implementation computes one function: causal softmax attention with grouped-query heads,
optionally within documents. The blockwise kernel and TPU splash attention (Pallas, interpret
mode on CPU) are compared with the XLA path in forward and gradients; the cuDNN wrapper is run
through JAX's XLA implementation to check its layout and GQA grouping. Document masking is
checked at the model level: a packed row scores every document as if it ran alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType

from perijax import attention as A
from perijax.config import ConfigError, ModelConfig, resolve
from perijax.data.packing import PackedWindows, TokenStream, doc_offsets_from_eod
from perijax.model import Transformer

PLACEMENTS = ["pre", "post", "peri", "output"]
EOD = 0


def _qkv(b=2, t=128, h=4, kv=2, dh=16, dtype=jnp.float32, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(b, t, h, dh)), dtype)
    k = jnp.asarray(r.normal(size=(b, t, kv, dh)), dtype)
    v = jnp.asarray(r.normal(size=(b, t, kv, dh)), dtype)
    return q, k, v


def _segments(b=2, t=128, seed=0):
    """Document ids of random packed rows: about one end-of-document token in 12."""
    tokens = np.random.default_rng(seed).integers(0, 12, size=(b, t))
    return A.document_ids(jnp.asarray(tokens), EOD)


def _reference(q, k, v, seg):
    return A.xla_attention(q, k, v, A.causal_mask(seg, q.shape[1]))


def _value_and_grads(fn, q, k, v, seg):
    """A scalar of the output (weighted, so every entry matters) and its q/k/v gradients."""
    w = jnp.cos(jnp.arange(q.size, dtype=jnp.float32).reshape(q.shape))

    def loss(q, k, v):
        return jnp.sum(fn(q, k, v, seg).astype(jnp.float32) * w)

    return jax.value_and_grad(loss, argnums=(0, 1, 2))(q, k, v)


def _assert_same(fn, q, k, v, seg, tol):
    out, ref = fn(q, k, v, seg), _reference(q, k, v, seg)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    err = jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32)).max()
    assert err < tol, err
    value, grads = _value_and_grads(fn, q, k, v, seg)
    ref_value, ref_grads = _value_and_grads(_reference, q, k, v, seg)
    assert abs(value - ref_value) <= tol * max(1.0, abs(ref_value))
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.dtype == r.dtype
        rel = jnp.linalg.norm((g - r).astype(jnp.float32)) / jnp.linalg.norm(r.astype(jnp.float32))
        assert rel < tol, rel


# --- blockwise --------------------------------------------------------------------------------


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("blocks", [(32, 32), (64, 16), (16, 64), (128, 128)])
def test_blockwise_equals_xla(blocks, documents):
    q, k, v = _qkv()
    seg = _segments() if documents else None

    def fn(q, k, v, seg):
        return A.blockwise_attention(q, k, v, seg, block_q=blocks[0], block_kv=blocks[1])

    _assert_same(fn, q, k, v, seg, tol=2e-5)


def test_blockwise_bfloat16_within_rounding():
    q, k, v = _qkv(dtype=jnp.bfloat16)
    _assert_same(lambda *a: A.blockwise_attention(*a, block_q=32, block_kv=64), q, k, v,
                 _segments(), tol=3e-2)  # fmt: skip


def test_blockwise_keeps_no_square_of_scores():
    """The point of the kernel: nothing [T, T]-sized is kept for the backward pass (the XLA path
    keeps its probabilities), so activation memory is linear in T."""
    q, k, v = _qkv(t=256)
    seg = _segments(t=256)

    def kept(fn):
        _, backward = jax.vjp(lambda q, k, v: fn(q, k, v, seg), q, k, v)
        return [a.shape for a in jax.tree.leaves(backward) if a.ndim >= 2 and a.shape[-1] == 256
                and a.shape[-2] == 256]  # fmt: skip

    assert kept(_reference)  # the XLA path keeps [.., T, T] probabilities
    assert kept(lambda *a: A.blockwise_attention(*a, block_q=64, block_kv=64)) == []


def test_blockwise_refuses_blocks_that_do_not_divide():
    q, k, v = _qkv(t=96)
    with pytest.raises(ValueError, match="must divide the sequence length 96"):
        A.blockwise_attention(q, k, v, block_q=64)
    assert A.block_len(96) == 96 and A.block_len(8192) == 512 and A.block_len(1000) == 500


# --- splash (Pallas, interpret mode on CPU) ---------------------------------------------------


@pytest.mark.parametrize("documents", [False, True])
def test_splash_equals_xla(documents):
    """Causal, grouped-query (4 query heads on 2 kv heads, no K/V copies), segment ids."""
    q, k, v = _qkv(t=128, dh=32)
    seg = _segments() if documents else None
    _assert_same(lambda *a: A.splash_attention(*a, interpret=True), q, k, v, seg, tol=2e-5)


def test_splash_per_shard_under_a_mesh():
    """With a mesh set, splash runs per shard under shard_map: batch over data x fsdp, heads
    over tensor; the result is the unsharded one."""
    q, k, v = _qkv(b=4, t=128, h=4, kv=2, dh=32)
    seg = _segments(b=4)
    mesh = jax.make_mesh((2, 1, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                         devices=jax.devices()[:4])  # fmt: skip
    with jax.set_mesh(mesh):
        out = jax.jit(lambda *a: A.splash_attention(*a, interpret=True))(q, k, v, seg)
    ref = _reference(q, k, v, seg)
    assert float(jnp.abs(out - ref).max()) < 2e-5


# --- cuDNN wrapper ----------------------------------------------------------------------------


def test_cudnn_wrapper_layout_and_grouping():
    """The wrapper hands q [B, T, H, Dh] and k, v [B, S, K, Dh] to jax.nn.dot_product_attention
    as they are; run through JAX's XLA implementation, it equals our path, which maps query head
    h to kv head h // (H / K), and equals MHA with K/V repeated that way."""
    q, k, v = _qkv(h=6, kv=2)
    out = A.cudnn_attention(q, k, v, implementation="xla")
    ref = _reference(q, k, v, None)
    assert float(jnp.abs(out - ref).max()) < 1e-5
    repeated = A.xla_attention(q, jnp.repeat(k, 3, axis=2), jnp.repeat(v, 3, axis=2),
                               A.causal_mask(None, q.shape[1]))  # fmt: skip
    assert float(jnp.abs(out - repeated).max()) < 1e-5


# --- choosing a kernel ------------------------------------------------------------------------


def test_auto_resolves_per_backend():
    assert A.resolve("auto", "gpu") == "cudnn"
    assert A.resolve("auto", "tpu") == "splash"
    assert A.resolve("auto", "cpu") == "xla"
    assert A.resolve("blockwise", "gpu") == "blockwise"
    assert ModelConfig().attention == "auto"
    assert A.describe("auto", "gpu") == "cudnn (auto on gpu)"


def test_explicit_kernels_are_checked_against_the_backend():
    with pytest.raises(ConfigError, match="model.attention=cudnn needs an NVIDIA GPU, but the "
                       "backend is cpu"):  # fmt: skip
        A.check("cudnn", jnp.bfloat16, "cpu")
    with pytest.raises(ConfigError, match="needs model.dtype=bfloat16"):
        A.check("cudnn", jnp.float32, "gpu")
    A.check("auto", jnp.float32, "gpu")  # auto falls back instead (test_fallbacks_say_so_once)
    A.check("auto", jnp.float32, "cpu")
    A.check("blockwise", jnp.float32, "cpu")


def test_fallbacks_say_so_once(capsys):
    """A fused kernel that cannot take a call falls back (document masking on cuDNN: blockwise;
    a decoding mask: xla), prints one note per reason, and computes the same function."""
    q, k, v = _qkv()
    seg = _segments()
    A._noted.clear()
    for _ in range(2):
        out = A.attend("cudnn", q, k, v, segment_ids=seg)
    assert float(jnp.abs(out - _reference(q, k, v, seg)).max()) < 2e-5
    err = capsys.readouterr().err
    assert err.count("note: cudnn attention has no document masking") == 1
    assert "using blockwise attention instead" in err
    A.attend("cudnn", q, k, v)  # float32 inputs: cuDNN takes bfloat16 or float16 only
    assert "cudnn attention needs bfloat16 or float16 inputs, not float32" in (
        capsys.readouterr().err
    )
    mask = jnp.asarray(np.tril(np.ones((128, 128), bool)))[None].repeat(2, 0)
    out = A.attend("splash", q, k, v, mask=mask)
    assert float(jnp.abs(out - _reference(q, k, v, None)).max()) < 1e-5
    assert "splash attention takes no explicit mask: decoding uses the xla path" in (
        capsys.readouterr().err
    )


# --- document ids and positions ---------------------------------------------------------------


def test_document_ids_match_the_loader():
    """Segment ids derived from end-of-document tokens in the step equal the ones the data
    loader computes from document offsets (`PackedWindows(segment_ids=True)`)."""
    tokens = np.random.default_rng(3).integers(0, 9, size=2000).astype(np.int32)
    stream = TokenStream(arrays=[(tokens, doc_offsets_from_eod(tokens, EOD))])
    windows = PackedWindows(stream, 64, segment_ids=True)
    for i in range(len(windows)):
        record = windows[i]
        derived = A.document_ids(jnp.asarray(record["tokens"]), EOD)
        np.testing.assert_array_equal(np.asarray(derived), record["segment_ids"])


def test_document_positions_restart_at_each_document():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 4, 4, 4, 4]])
    np.testing.assert_array_equal(A.document_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1, 2, 3]])


# --- the model with document masking ----------------------------------------------------------


def _model(placement, attention="xla", **kw):
    cfg = ModelConfig(vocab_size=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                      d_ff=64, ln_placement=placement, attention=attention, dtype="float32",
                      **kw)  # fmt: skip
    return Transformer(cfg, rngs=nnx.Rngs(0))


def _packed_row():
    """One row of three documents (each ending with EOD) and a fourth cut off by the window."""
    r = np.random.default_rng(7)
    docs = [np.append(r.integers(1, 32, n), EOD) for n in (9, 4, 12)] + [r.integers(1, 32, 6)]
    return docs, np.concatenate(docs)[None].astype(np.int32)


@pytest.mark.parametrize("attention", ["xla", "blockwise"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_packed_row_equals_each_document_alone(placement, attention):
    model = _model(placement, attention)
    docs, row = _packed_row()
    packed = model(jnp.asarray(row), segment_ids=A.document_ids(jnp.asarray(row), EOD))
    start = 0
    for doc in docs:
        alone = model(jnp.asarray(doc[None].astype(np.int32)))
        np.testing.assert_allclose(packed[0, start : start + len(doc)], alone[0], atol=2e-5)
        start += len(doc)
    unmasked = model(jnp.asarray(row))  # without masking, later documents see earlier ones
    assert not np.allclose(unmasked[0, len(docs[0]) :], packed[0, len(docs[0]) :], atol=1e-3)
    np.testing.assert_allclose(unmasked[0, : len(docs[0])], packed[0, : len(docs[0])], atol=2e-5)


def _train_cfg(masking: bool):
    from configs import tiny

    cfg = tiny.get_config()
    cfg.data.document_masking = masking
    cfg.model.attention = "xla"
    cfg.train.global_batch_size = 8
    return resolve(cfg)


def test_training_with_masking_differs_only_where_documents_meet():
    """One train step with document masking on and off: identical on rows that hold a single
    document (no end-of-document token before the last input), different on packed rows."""
    from perijax import train as train_lib

    results = {}
    for masking in (False, True):
        cfg = _train_cfg(masking)
        mesh = train_lib.setup(cfg, jax.devices()[:1])[0]
        vocab, t = cfg.model.vocab_size, cfg.data.seq_len
        b = cfg.train.global_batch_size
        r = np.random.default_rng(0)
        single = r.integers(1, vocab, size=(b, t + 1)).astype(np.int32)  # no EOD anywhere
        packed = single.copy()
        packed[:, t // 3] = EOD
        eod = EOD if masking else None
        step = train_lib.compile_train_step(cfg, mesh, eod_id=eod)
        for name, batch in (("single", single), ("packed", packed)):
            state = train_lib.init_state(cfg, mesh)
            with jax.set_mesh(mesh):
                _, metrics = step(state, jnp.asarray(batch.reshape(b, 1, t + 1)))
            results[masking, name] = float(metrics["train/loss"])
    assert results[False, "single"] == results[True, "single"]
    assert results[False, "packed"] != results[True, "packed"]


def test_masking_needs_an_end_of_document_token():
    from perijax import train as train_lib

    cfg = _train_cfg(True)
    data = dataclasses.make_dataclass("D", [("eod_id", object), ("name", str)])(None, "bytes256")
    with pytest.raises(ConfigError, match="data.document_masking=true needs documents that end "
                       "with an end-of-document token, but data 'bytes256' has none"):  # fmt: skip
        train_lib.document_eod(cfg, data)
    assert train_lib.document_eod(_train_cfg(False), data) is None
