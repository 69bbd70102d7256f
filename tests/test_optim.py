"""Learning-rate schedules and the weight-decay mask."""

from pathlib import Path

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


@pytest.mark.parametrize("shape", ["1-sqrt", "linear", "cosine"])
def test_wsd_warms_up_holds_then_decays_over_the_last_steps(shape):
    """warmup 10, stable to step 80, decay over the last 20 of 100 steps (decay_fraction 0.2
    or decay_steps 20) to lr * min_lr_ratio, by the chosen shape."""
    base = dict(lr=1e-3, schedule="wsd", warmup_steps=10, min_lr_ratio=0.1, decay_shape=shape)
    fn = lr_schedule(OptimConfig(**base, decay_fraction=0.2), total_steps=100)
    same = lr_schedule(OptimConfig(**base, decay_steps=20), total_steps=100)
    steps = np.arange(0, 101)
    assert np.allclose([float(fn(t)) for t in steps], [float(same(t)) for t in steps])
    assert float(fn(0)) == 0.0 and float(fn(5)) == pytest.approx(5e-4)
    assert [float(fn(t)) for t in (10, 40, 80)] == pytest.approx([1e-3] * 3)
    assert float(fn(100)) == pytest.approx(1e-4)
    p = 0.25  # step 85: a quarter of the decay done
    f = {"1-sqrt": 1 - np.sqrt(p), "linear": 1 - p, "cosine": 0.5 * (1 + np.cos(np.pi * p))}
    assert float(fn(85)) == pytest.approx(1e-4 + 9e-4 * f[shape], rel=1e-5)


def test_wsd_stable_part_does_not_depend_on_the_run_length():
    """A run of 1000 steps and one of 300 (both decaying over their last 50) have the same
    learning rate up to step 250: a short run is a branch of the long one's stable phase."""
    cfg = OptimConfig(lr=1e-3, schedule="wsd", warmup_steps=10, decay_steps=50)
    long, short = lr_schedule(cfg, 1000), lr_schedule(cfg, 300)
    assert all(float(long(t)) == float(short(t)) for t in range(0, 251))
    assert float(short(300)) < float(long(300)) == pytest.approx(1e-3)


def test_wsd_longer_than_the_run_is_a_one_line_error():
    from perijax import config as config_lib

    with pytest.raises(config_lib.ConfigError, match=r"^optim.schedule=wsd: warmup \(10\) and "
                       r"decay \(95 steps\) exceed train.total_steps=100"):  # fmt: skip
        config_lib.load(
            str(Path(__file__).resolve().parents[1] / "configs" / "tiny.py"),
            [("optim.schedule", "wsd"), ("optim.warmup_steps", "10"),
             ("optim.decay_steps", "95"), ("train.total_steps", "100")],
        )  # fmt: skip


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
