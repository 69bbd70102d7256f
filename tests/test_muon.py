"""optim.name=muon: Muon for the hidden matrices (chosen by logical axes), AdamW for the rest;
orthogonalized updates, sharded = one device, bit-exact resume."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from test_checkpoint import config, losses_by_step, params_of, stop_at
from test_sharding import run as sharded_run

from perijax import train as train_lib
from perijax.config import ModelConfig, OptimConfig
from perijax.model import Transformer
from perijax.optim import MUON_RMS, make_optimizer, muon_dimensions

MODEL = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                    d_ff=48, tie_embeddings=False)  # fmt: skip


@pytest.mark.parametrize("scan", [False, True])
def test_muon_takes_the_hidden_matrices_by_their_logical_axes(scan):
    """Attention and MLP matrices (embed x heads x kv, embed x mlp, and their transposes) get
    Muon with `embed` on the input side first; a stacked `layers` axis is a batch axis; the
    embedding, the head and the norm scales do not."""
    dims = muon_dimensions(dataclasses.replace(MODEL, scan_layers=scan))
    names = {k.split("/")[-1] for k in dims}
    assert names == {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"}
    assert not any("norm" in k or k in ("embed", "lm_head") for k in dims)
    first = 1 if scan else 0  # axis 0 is `layers` when stacked
    wq = next(v for k, v in dims.items() if k.endswith("attn/wq"))
    wo = next(v for k, v in dims.items() if k.endswith("attn/wo"))
    down = next(v for k, v in dims.items() if k.endswith("mlp/w_down"))
    assert wq == ((first,), (first + 1, first + 2))  # embed -> heads x kv
    assert wo == ((first, first + 1), (first + 2,))  # heads x kv -> embed
    assert down == ((first,), (first + 1,))  # mlp -> embed
    assert len(dims) == 7 * (1 if scan else MODEL.num_layers)


def test_muon_updates_are_orthogonalized_and_adamw_updates_unchanged():
    """One step with momentum off: each hidden matrix's update, divided by lr and the RMS
    scale, has all singular values near 1 (Newton-Schulz); the embedding's update is exactly
    AdamW's."""
    model = Transformer(MODEL, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda x: jax.random.normal(jax.random.key(1), x.shape), params)
    base = dict(lr=1e-2, warmup_steps=0, schedule="constant", weight_decay=0.0,
                grad_clip_norm=0.0)  # fmt: skip
    muon = make_optimizer(OptimConfig(**base, name="muon", muon_beta=0.0), 10, MODEL)
    adamw = make_optimizer(OptimConfig(**base), 10, MODEL)
    upd, _ = muon.update(grads, muon.init(params), params)
    ref, _ = adamw.update(grads, adamw.init(params), params)
    np.testing.assert_array_equal(upd["embed"].get_value(), ref["embed"].get_value())
    np.testing.assert_array_equal(upd["lm_head"].get_value(), ref["lm_head"].get_value())
    w = upd["blocks"][0]["mlp"]["w_up"].get_value()  # [32, 48]
    s = np.linalg.svd(np.asarray(w) / (-1e-2 * MUON_RMS * np.sqrt(48)), compute_uv=False)
    assert 0.6 < s.min() and s.max() < 1.3, s
    # embed x (heads * kv), square: a random square gradient has a few singular values near 0,
    # which five Newton-Schulz steps lift only part way; the rest land near 1.
    wq = upd["blocks"][0]["attn"]["wq"].get_value().reshape(32, -1)
    s = np.linalg.svd(np.asarray(wq) / (-1e-2 * MUON_RMS * np.sqrt(32)), compute_uv=False)
    assert np.mean((0.6 < s) & (s < 1.3)) >= 0.9 and s.max() < 1.3, s
    assert not np.allclose(w, ref["blocks"][0]["mlp"]["w_up"].get_value())


@pytest.mark.slow
def test_muon_on_a_mesh_trains_like_one_device(tmp_path):
    """fsdp x tensor = 2 x 4: the orthogonalization sees each whole matrix (GSPMD gathers what
    it needs), so the losses equal one device's within float32 reduction-order noise."""
    muon = {"optim.name": "muon", "optim.lr": "1e-2"}
    one, _ = sharded_run(tmp_path, "one", devices=jax.devices()[:1], **muon)
    mesh, state = sharded_run(tmp_path, "mesh", **muon, **{"mesh.fsdp": "2", "mesh.tensor": "4"})
    np.testing.assert_allclose(mesh, one, rtol=2e-5)
    assert state.params["blocks"][0]["attn"]["wq"].get_value().sharding.spec[:2] == (
        "fsdp",
        "tensor",
    )


@pytest.mark.slow
def test_muon_state_is_checkpointed_and_resumes_bit_exactly(tmp_path):
    cfg = config(**{"optim.name": "muon", "optim.lr": "1e-2"})
    straight = train_lib.train(cfg, tmp_path / "straight", log=lambda s: None)
    first = train_lib.train(cfg, tmp_path / "resumed", log=stop_at(4))
    assert first["preempted"]
    second = train_lib.train(cfg, tmp_path / "resumed", log=lambda s: None)
    assert losses_by_step(tmp_path / "resumed") == losses_by_step(tmp_path / "straight")
    for a, b in zip(params_of(second), params_of(straight), strict=True):
        np.testing.assert_array_equal(a, b)
    mu = [x for x in jax.tree.leaves(second["state"].opt_state) if getattr(x, "ndim", 0) >= 2]
    assert mu and all(isinstance(x, jax.Array) for x in mu)
