"""model.matmul_dtype=float8: per-tensor current scaling of e4m3 operands and e5m2 gradients
(perijax.model.float8_einsum), training numerics against bfloat16, the e4m3 telemetry."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from test_checkpoint import config, losses_by_step

from perijax import train as train_lib
from perijax.model import float8_einsum, mixed_einsum
from perijax.telemetry import stream_stats


def _quantized(x: np.ndarray, dtype) -> tuple[np.ndarray, float]:
    """numpy reference: x scaled so its amax is the format's largest value, rounded to it."""
    top = float(ml_dtypes.finfo(dtype).max)
    scale = np.float32(top / np.abs(x).max())
    q = np.clip(x.astype(np.float32) * scale, -top, top).astype(dtype).astype(np.float32)
    return q, scale


def test_float8_einsum_is_the_product_of_the_scaled_float8_operands():
    """Forward: (q8(a) @ q8(b)) / (s_a s_b) with e4m3; backward: e5m2 of the output gradient
    times the same e4m3 copies, unscaled — computed here in numpy from the definitions."""
    ka, kb, kg = jax.random.split(jax.random.key(0), 3)
    a = jax.random.normal(ka, (2, 8, 32)) * 3.0
    b = jax.random.normal(kb, (32, 16)) * 0.02
    g = jax.random.normal(kg, (2, 8, 16)) * 1e-3
    out, vjp = jax.vjp(lambda a, b: float8_einsum("btd,df->btf", a, b), a, b)
    da, db = vjp(g)
    qa, sa = _quantized(np.asarray(a), ml_dtypes.float8_e4m3fn)
    qb, sb = _quantized(np.asarray(b), ml_dtypes.float8_e4m3fn)
    qg, sg = _quantized(np.asarray(g), ml_dtypes.float8_e5m2)
    np.testing.assert_allclose(out, np.einsum("btd,df->btf", qa, qb) / (sa * sb), rtol=1e-5)
    np.testing.assert_allclose(da, np.einsum("btf,df->btd", qg, qb) / (sg * sb), rtol=1e-5)
    np.testing.assert_allclose(db, np.einsum("btd,btf->df", qa, qg) / (sa * sg), rtol=1e-5)
    # ... and close to the exact product: e4m3 keeps 3 mantissa bits, e5m2 2.
    exact, exact_vjp = jax.vjp(lambda a, b: mixed_einsum("btd,df->btf", a, b), a, b)
    rel = lambda x, y: float(jnp.linalg.norm(x - y) / jnp.linalg.norm(y))  # noqa: E731
    assert rel(out, exact) < 0.05
    assert all(rel(x, y) < 0.15 for x, y in zip((da, db), exact_vjp(g), strict=True))
    zero, _ = jax.vjp(lambda a: float8_einsum("btd,df->btf", a, b), jnp.zeros_like(a))
    assert not jnp.any(jnp.isnan(zero)) and not jnp.any(zero)  # amax 0: scale 1, no NaN


def test_float8_training_follows_bfloat16_within_two_percent(tmp_path):
    """40 steps of the test model in bfloat16 with and without float8 matmuls: every logged
    loss within 2% of bfloat16's, and the float8 loss falls (from ln 64 = 4.16 to below 3.96:
    the synthetic stream's learnable part)."""
    base = {"model.dtype": "bfloat16", "train.total_steps": "40", "optim.lr": "3e-3"}
    runs = {}
    for name, matmul in (("bf16", "compute"), ("f8", "float8")):
        train_lib.train(config(**base, **{"model.matmul_dtype": matmul}), tmp_path / name,
                        log=lambda s: None)  # fmt: skip
        runs[name] = losses_by_step(tmp_path / name)
    bf16, f8 = runs["bf16"], runs["f8"]
    assert sorted(f8) == sorted(bf16) == list(range(1, 41))
    worst = max(abs(f8[s] - bf16[s]) / bf16[s] for s in bf16)
    assert worst < 0.02, worst
    assert f8[40] < f8[1] - 0.2, (f8[1], f8[40])
    assert f8 != bf16  # float8 did change the arithmetic


def test_the_e4m3_saturation_fraction_counts_entries_beyond_448():
    h = jnp.asarray([[1.0, -500.0, 447.0, 449.0], [0.0, 1e5, -448.0, 2.0]])
    stats = stream_stats(h, h)
    assert float(stats["frac_over_e4m3"]) == 3 / 8
    assert float(stats["frac_over_fp16"]) == 1 / 8
    assert float(stats["max_abs"]) == 1e5
