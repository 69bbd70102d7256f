"""Backend tuning (perijax/tuning): one decision point per backend, and the choices made for one
backend compute the same function as the library/autodiff versions used elsewhere."""

import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perijax import tuning
from perijax.config import ModelConfig
from perijax.model import Transformer
from perijax.norms import layer_norm, rms_norm

PLACEMENTS = ["pre", "post", "peri", "output"]


def test_one_decision_per_backend():
    assert tuning.current("cpu") is tuning.CPU
    assert tuning.current("gpu") is tuning.current("tpu") is tuning.ACCELERATOR
    assert tuning.backend() == "cpu" and tuning.current() is tuning.CPU
    with tuning.planning_for("gpu"):
        assert tuning.backend() == "gpu" and tuning.current() is tuning.ACCELERATOR
        assert tuning.normalizer("rmsnorm", rms_norm) is rms_norm
        assert tuning.compiler_options() is None
        with tuning.planning_for("cpu"):
            assert tuning.current() is tuning.CPU
    assert tuning.current() is tuning.CPU
    assert tuning.normalizer("rmsnorm", rms_norm) is not rms_norm  # the written-out backward
    assert tuning.normalizer("layernorm", layer_norm) is not layer_norm


def test_cpu_only_modules_sit_behind_the_tuning_package():
    """Only perijax/tuning imports its CPU modules; the rest of the library asks `tuning`."""
    root = Path(tuning.__file__).parent.parent
    pattern = re.compile(r"\b(cpu_malloc|cpu_compiler|cpu_kernels|hostmem|xla_options)\b")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for path in root.rglob("*.py")
        if "tuning" not in path.parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "import" in line and pattern.search(line)
    ]
    assert offenders == []


def _loss_and_grads(placement: str, norm_type: str):
    cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                      d_ff=64, ln_placement=placement, norm_type=norm_type, dtype="float32",
                      attention="xla")  # fmt: skip
    graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, size=(2, 17)), jnp.int32)

    def loss(params):
        total, count, _ = nnx.merge(graphdef, params).loss(tokens[:, :-1], tokens[:, 1:])
        return total / count

    return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_accelerator_choices_compute_the_cpu_function(placement, norm_type):
    """Loss and every gradient of the model traced with the GPU/TPU choices (autodiff norms and
    attention, rotary tables in the step) equal those with the CPU choices."""
    cpu_loss, cpu_grads = _loss_and_grads(placement, norm_type)
    with tuning.planning_for("gpu"):
        acc_loss, acc_grads = _loss_and_grads(placement, norm_type)
    assert abs(float(cpu_loss) - float(acc_loss)) < 1e-5
    for a, b in zip(jax.tree.leaves(cpu_grads), jax.tree.leaves(acc_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-6)


def test_choices_follow_the_backend_traced_for(monkeypatch):
    """`planning_for` decides what the jax backend would otherwise: the automatic compute dtype,
    the automatic attention kernel and whether an explicit one can run, and whether splash runs
    as the real Pallas kernel or interpreted. A TPU program compiled from a CPU host must hold
    the real kernel (docs/scaling.md)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    from perijax import attention
    from perijax.config import ConfigError
    from perijax.model import compute_dtype

    auto = ModelConfig()
    interpreted = []
    real = sk.make_splash_mha

    def record(*args, interpret, **kwargs):
        interpreted.append(interpret)
        return real(*args, interpret=True, **kwargs)  # traceable on CPU either way

    monkeypatch.setattr(sk, "make_splash_mha", record)
    q = k = v = jnp.zeros((1, 128, 2, 64), jnp.float32)  # [B, T, H, Dh]: one 128-wide block

    def trace_splash():  # a new function each time: jax caches traces by function
        jax.eval_shape(lambda *a: attention.splash_attention(*a), q, k, v)

    for backend, dtype, kernel in [("tpu", "bfloat16", "splash"), ("gpu", "bfloat16", "cudnn")]:
        with tuning.planning_for(backend):
            assert jnp.dtype(compute_dtype(auto)) == jnp.dtype(dtype)
            assert attention.describe("auto") == f"{kernel} (auto on {backend})"
            attention.check(kernel, jnp.bfloat16)
            trace_splash()
    assert jnp.dtype(compute_dtype(auto)) == jnp.float32
    assert attention.describe("auto") == "xla (auto on cpu)"
    with pytest.raises(ConfigError, match="model.attention=splash needs a TPU"):
        attention.check("splash", jnp.bfloat16)
    trace_splash()
    assert interpreted == [False, True, True]  # the real kernel only when tracing for a TPU
