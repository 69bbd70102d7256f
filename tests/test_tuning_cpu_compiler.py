"""CPU compile options of the model's steps: only matmuls go to XLA:CPU's library fusions, the
step computes the same update as with XLA's defaults, and the user can turn the option off."""

import re
from pathlib import Path

import jax
import numpy as np
import pytest

from perijax import config as config_lib
from perijax import step as step_lib
from perijax import train as train_lib
from perijax.tuning import cpu_compiler as xla_options

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data.source": "synthetic", "data.seq_len": "64", "model.vocab_size": "256",
    "model.num_layers": "2", "model.d_model": "128", "model.num_heads": "4", "model.d_ff": "256",
    "model.dtype": "bfloat16", "train.global_batch_size": "8", "optim.warmup_steps": "0",
    "model.ln_placement": "peri",
}  # fmt: skip


def _library_fusions_with_reductions(hlo: str) -> int:
    """How many library (YNNPACK) fusions of a compiled module contain a reduce."""
    bodies = {}
    for m in re.finditer(r"^%(\S+) \([^\n]*\{\n(.*?)^\}", hlo, re.S | re.M):
        bodies[m.group(1)] = m.group(2)
    called = re.findall(r"calls=%([\w.\-]+)[^\n]*__ynn_fusion", hlo)
    return sum(" reduce(" in bodies.get(name, "") for name in called)


def test_cpu_steps_send_only_matmuls_to_the_library_and_compute_the_same_update():
    cfg = config_lib.load(str(ROOT / "configs" / "tiny.py"), list(BASE.items()))
    mesh = train_lib.setup(cfg, jax.devices()[:1])[0]
    state = train_lib.init_state(cfg, mesh)
    batch = np.random.default_rng(0).integers(0, 256, (8, 1, 65)).astype(np.int32)
    assert xla_options.step_compiler_options() == xla_options.CPU_OPTIONS

    tuned_fn = train_lib.compile_train_step(cfg, mesh)
    default_fn = jax.jit(step_lib.train_step)  # XLA's defaults, no compiler options
    with jax.set_mesh(mesh):
        tuned = tuned_fn.lower(state, batch).compile()
        default = default_fn.lower(state, batch).compile()
        assert _library_fusions_with_reductions(tuned.as_text()) == 0
        if _library_fusions_with_reductions(default.as_text()) == 0:
            pytest.skip("this XLA sends no reductions to its CPU library by default")
        want = default(state, batch)[1]
        got = tuned(state, batch)[1]  # donates `state`: runs last
    # bfloat16 compute: the two programs round differently, not more.
    np.testing.assert_allclose(got["train/loss"], want["train/loss"], rtol=1e-4)
    np.testing.assert_allclose(got["train/grad_norm"], want["train/grad_norm"], rtol=1e-2)


def test_tuning_steps_aside_for_the_user(monkeypatch):
    monkeypatch.delenv(xla_options.ENV_SWITCH, raising=False)
    assert xla_options.step_compiler_options() == xla_options.CPU_OPTIONS
    monkeypatch.setenv(xla_options.ENV_SWITCH, "0")
    assert xla_options.step_compiler_options() is None
    monkeypatch.setenv(xla_options.ENV_SWITCH, "1")
    flags = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setenv("XLA_FLAGS", flags)  # read per call; jax is already started
    assert xla_options.step_compiler_options() is None
    assert "default" in xla_options.describe()
