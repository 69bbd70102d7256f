"""Learning-rate schedules and the weight-decay mask."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from perijax.config import ModelConfig, OptimConfig
from perijax.model import Transformer
from perijax.optim import decay_mask, lr_schedule, make_optimizer


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warmup_peak_and_end(schedule):
    cfg = OptimConfig(lr=1e-3, schedule=schedule, warmup_steps=10, min_lr_ratio=0.1)
    fn = lr_schedule(cfg, total_steps=110)
    assert float(fn(0)) == 0.0
    assert float(fn(5)) == pytest.approx(5e-4)
    assert float(fn(10)) == pytest.approx(1e-3)
    end = {"cosine": 1e-4, "linear": 1e-4, "constant": 1e-3}[schedule]
    assert float(fn(110)) == pytest.approx(end)
    if schedule == "cosine":  # half way through the decay: (1 + min) / 2 of the peak
        assert float(fn(60)) == pytest.approx(1e-3 * 0.55, rel=1e-5)


def flat(tree) -> dict:
    """{"blocks/0/mlp/w_up": leaf} for any pytree of nnx variables."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        keys = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        out["/".join(k for k in keys if k != "value")] = leaf
    return out


def test_weight_decay_skips_norms_and_biases():
    cfg = ModelConfig(vocab_size=32, num_layers=1, d_model=16, num_heads=2, d_ff=32,
                      ln_placement="peri", norm_type="layernorm", qk_norm="full")  # fmt: skip
    params = nnx.state(Transformer(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    mask = flat(decay_mask(params))
    assert {p for p, decays in mask.items() if not decays} == {p for p in mask if "norm" in p}
    assert any(p.endswith("bias") for p in mask) and any(p.endswith("k_norm/scale") for p in mask)
    assert mask["blocks/0/mlp/w_up"] and mask["embed"] and mask["lm_head"]

    # With zero gradients only weight decay moves parameters: norms must not move at all.
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=0, weight_decay=0.5), 10)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    before, after = flat(params), flat(optax.apply_updates(params, updates))
    for name, value in after.items():
        if "norm" in name:
            np.testing.assert_array_equal(value, before[name])
        else:
            np.testing.assert_allclose(value, before[name] * (1 - 1e-2 * 0.5), rtol=1e-6)
