"""XLA compile options for the model's jitted computations (train, eval and scoring steps).

On CPU, XLA hands some fused computations to the YNNPACK library ("library fusions"). By default
that includes elementwise-plus-reduction fusions, such as a norm's mean of squares or the column
sums of its scale gradient; to feed the library, XLA first materializes every converted or
broadcast operand as a full float32 array. Sending only the matmuls to the library
(`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) and leaving the rest to XLA's own loop fusions makes the
norms and the whole step faster (docs/performance.md, "On CPU: library fusions", has the
numbers).

`step_compiler_options()` returns that option for `jax.jit(..., compiler_options=...)` when JAX
runs on CPU, the installed XLA knows it (checked once with a tiny compile), the user's
`XLA_FLAGS` do not set the same flag, and `PERIJAX_XLA_CPU_TUNING` is not `0`. Otherwise it
returns None and XLA's defaults apply. GPU and TPU are untouched.
"""

from __future__ import annotations

import functools
import os
from typing import Any

CPU_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
CPU_OPTIONS: dict[str, Any] = {CPU_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
ENV_SWITCH = "PERIJAX_XLA_CPU_TUNING"


def step_compiler_options() -> dict[str, Any] | None:
    """`compiler_options` for the model's jitted steps on the default backend (None: defaults)."""
    import jax

    if jax.default_backend() != "cpu" or not wanted():
        return None
    return dict(CPU_OPTIONS) if _supported() else None


def wanted() -> bool:
    """False when the user turned the tuning off or chose the flag in XLA_FLAGS themselves."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    return CPU_FUSION_FLAG not in os.environ.get("XLA_FLAGS", "")


@functools.cache
def _supported() -> bool:
    """Whether this XLA accepts CPU_OPTIONS (an older or newer one may not know the flag)."""
    import jax
    import jax.numpy as jnp

    try:
        x = jax.device_put(jnp.zeros((2,), jnp.float32), jax.devices("cpu")[0])
        jax.jit(lambda v: v + 1, compiler_options=CPU_OPTIONS).lower(x).compile()
    except Exception:  # noqa: BLE001 - XLA reports an unknown option or value as a runtime error
        return False
    return True


def describe() -> str:
    """One phrase for logs and reports: which CPU library fusions the steps are compiled with."""
    opts = step_compiler_options()
    if opts:
        return "XLA:CPU library fusions: matmuls only (perijax/xla_options.py)"
    return "XLA:CPU library fusions: XLA's default"
