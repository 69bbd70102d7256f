"""Stability telemetry: values equal an independent NumPy computation from a plain forward pass,
non-log steps pay nothing for it, and spikes are counted by their definition."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_model import np_attention, np_mlp, np_norm

from perijax import config as config_lib
from perijax import step as step_lib
from perijax import telemetry as telemetry_lib
from perijax import train as train_lib
from perijax.checkpoint import flatten
from perijax.metrics import expand_layers

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data.source": "synthetic", "data.seq_len": "12", "model.vocab_size": "64",
    "model.num_layers": "3", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "model.dtype": "float32", "train.global_batch_size": "4", "optim.warmup_steps": "0",
    "model.init_std": "0.2",
}  # fmt: skip


def config(**overrides):
    return config_lib.load(str(ROOT / "configs" / "tiny.py"), list({**BASE, **overrides}.items()))


@pytest.mark.parametrize(
    "placement, scan",
    [("pre", "false"), ("post", "false"), ("peri", "false"), ("output", "false"), ("peri", "true")],
)
def test_telemetry_equals_numpy_forward(placement, scan):
    cfg = config(**{"model.ln_placement": placement, "model.scan_layers": scan})
    state = step_lib.create_state(cfg)
    batch = np.random.default_rng(0).integers(0, 64, (4, 1, 13)).astype(np.int32)
    new_state, metrics = jax.jit(step_lib.telemetry_step)(state, batch)
    got = expand_layers(jax.device_get(metrics))

    # Independent forward in NumPy, recording the stream after each sublayer.
    m = cfg.model
    flat = {k: np.asarray(v, np.float64) for k, v in flatten(state.params).items()}

    def layer(i):
        prefix = f"blocks.{i}." if scan == "false" else "blocks."
        w = {
            k[len(prefix) :]: (v if scan == "false" else v[i])
            for k, v in flat.items()
            if k.startswith(prefix)
        }
        return w

    def norm(w, name):
        return lambda y: np_norm(y, w.get(f"{name}.scale"), None, m.norm_type, m.norm_eps)

    x = flat["embed"][batch[:, 0, :-1]]
    for i in range(m.num_layers):
        w = layer(i)
        attn_w = {k: w[f"attn.{k}"] for k in ("wq", "wk", "wv", "wo")}
        mlp_w = {k: w[f"mlp.{k}"] for k in ("w_gate", "w_up", "w_down")}
        fns = {
            "attn": lambda y, w=attn_w: np.stack([np_attention(s, w, m) for s in y]),
            "mlp": lambda y, w=mlp_w: np_mlp(y, w),
        }
        for sub, f in fns.items():
            if placement == "pre":
                added = f(norm(w, f"{sub}_input_norm")(x))
                x = x + added
            elif placement == "post":
                added = f(x)
                x = norm(w, f"{sub}_residual_norm")(x + added)
            elif placement == "peri":
                added = norm(w, f"{sub}_output_norm")(f(norm(w, f"{sub}_input_norm")(x)))
                x = x + added
            else:
                added = norm(w, f"{sub}_output_norm")(f(x))
                x = x + added
            key = f"{i:02d}/{sub}"
            np.testing.assert_allclose(
                got[f"stability/resid_var/{key}"], x.var(-1).mean(), rtol=1e-4
            )
            np.testing.assert_allclose(
                got[f"stability/resid_rms/{key}"], np.sqrt((x**2).mean()), rtol=1e-4
            )
            np.testing.assert_allclose(got[f"stability/max_abs/{key}"], np.abs(x).max(), rtol=1e-4)
            np.testing.assert_allclose(
                got[f"stability/sublayer_rms/{key}"], np.sqrt((added**2).mean()), rtol=1e-4
            )
            assert got[f"stability/frac_over_fp16/{key}"] == 0.0
            np.testing.assert_allclose(
                got[f"stability/frac_over_e4m3/{key}"], (np.abs(x) > 448).mean(), atol=1e-7
            )

    # Per-layer gradient norms and update ratios from the gradient and the update themselves.
    _, grads, _ = jax.jit(step_lib.loss_and_grads)(state, batch.swapaxes(0, 1))
    g, old, new = flatten(grads), flatten(state.params), flatten(new_state.params)
    for i in range(m.num_layers):
        if scan == "false":
            keys = [k for k in g if k.startswith(f"blocks.{i}.")]
            pick = lambda t, k: np.asarray(t[k])  # noqa: E731
        else:
            keys = [k for k in g if k.startswith("blocks.")]
            pick = lambda t, k, i=i: np.asarray(t[k])[i]  # noqa: E731
        gn = np.sqrt(sum((pick(g, k).astype(np.float64) ** 2).sum() for k in keys))
        np.testing.assert_allclose(got[f"stability/grad_norm/{i:02d}"], gn, rtol=1e-4)
        dn = np.sqrt(
            sum(((pick(new, k) - pick(old, k)).astype(np.float64) ** 2).sum() for k in keys)
        )
        pn = np.sqrt(sum((pick(old, k).astype(np.float64) ** 2).sum() for k in keys))
        np.testing.assert_allclose(got[f"stability/update_ratio/{i:02d}"], dn / pn, rtol=1e-3)
        for k in [k for k in keys if k.endswith("_norm.scale")]:
            name = k.split(".")[-2].removesuffix("_norm")
            np.testing.assert_allclose(
                got[f"stability/gamma/{i:02d}/{name}"], pick(new, k).mean(), rtol=1e-5
            )


def _compiled(cfg, telemetry_on):
    mesh = train_lib.setup(cfg, jax.devices()[:1])[0]
    step = train_lib.compile_train_step(cfg, mesh, telemetry_on=telemetry_on)
    abstract = jax.eval_shape(lambda: step_lib.create_state(cfg))
    batch = jax.ShapeDtypeStruct((2, 2, 13), jnp.int32)  # two micro-batches
    with jax.set_mesh(mesh):
        compiled = step.lower(abstract, batch).compile()
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"], compiled.as_text()


@pytest.mark.parametrize("scan", ["false", "true"])
def test_non_log_steps_pay_nothing_for_telemetry(scan):
    """The blocks sow their stream statistics in every forward pass; in the plain step nothing
    reads them and XLA removes them. The float16 maximum (65504) is a constant only
    `frac_over_fp16` uses: it is in the log-step program and not in the plain one."""
    cfg = config(**{"model.scan_layers": scan})
    plain_flops, plain = _compiled(cfg, False)
    log_flops, log = _compiled(cfg, True)
    assert "65504" in log and "65504" not in plain
    assert log_flops > plain_flops


def test_spikes_are_counted_by_definition():
    cfg = config(**{"telemetry.spike_min_history": "4", "telemetry.spike_window": "8"})
    state = step_lib.create_state(cfg)
    for value in [1.0, 1.1, 0.9, 1.0, 1.05]:  # history: median ~1.0
        state = state.replace(
            **telemetry_lib.count_spikes(state, jnp.float32(2.0), jnp.float32(value))
        )
    assert int(state.grad_spikes) == 0  # 1.05 < 3 x median
    counted = telemetry_lib.count_spikes(state, jnp.float32(2.0), jnp.float32(3.5))
    assert int(counted["grad_spikes"]) == 1  # 3.5 > 3 x 1.0
    counted = telemetry_lib.count_spikes(state, jnp.float32(2.5), jnp.float32(1.0))
    assert int(counted["loss_spikes"]) == 1  # 2.5 > 1.2 x 2.0
    nan = telemetry_lib.count_spikes(state, jnp.float32(jnp.nan), jnp.float32(jnp.nan))
    assert int(nan["history_count"]) == int(state.history_count)  # non-finite: not history


def test_frozen_norm_scales_report_no_gamma():
    cfg = config(**{"model.learnable_norm_scale": "false", "model.ln_placement": "peri"})
    state = step_lib.create_state(cfg)
    batch = np.random.default_rng(0).integers(0, 64, (4, 1, 13)).astype(np.int32)
    _, metrics = jax.jit(step_lib.telemetry_step)(state, batch)
    assert not [k for k in metrics if "gamma" in k]
