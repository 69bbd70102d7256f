"""Backend tuning: every choice perijax makes for one backend only, decided here.

The math modules (model.py, norms.py, attention.py, loss.py) ask one question each of this
module; everything they do otherwise is the same on every backend. The choices, each measured
on the backend it is made for (docs/performance.md, "Backend tuning", has the numbers):

| choice                                    | CPU | GPU / TPU | asked by |
|-------------------------------------------|-----|-----------|----------|
| norms' written-out backward (`cpu_kernels`) | yes | autodiff | norms.py (`normalizer`) |
| attention's written-out backward (XLA path) | yes | autodiff | attention.py |
| rotary tables as host constants             | yes | computed in the step | model.py |
| logits elements per loss chunk              | 2^22 | 2^28 | loss.py |
| XLA:CPU library fusions: matmuls only (`cpu_compiler`) | yes | XLA's defaults | the jitted steps |
| glibc malloc kept resident (`cpu_malloc`)   | yes | untouched | the `perijax` command |

On GPU and TPU the defaults are the library and autodiff versions until a measurement on that
backend says otherwise. `planning_for(backend)` makes the decisions for another backend than the
one JAX runs on: `perijax plan` compiles on CPU what a GPU or TPU would run.

Not backend tuning, and so not here: `perijax.model.mixed_einsum`'s backward pass casts the incoming
gradient to the compute dtype, so all three matmuls of a layer take bfloat16 inputs on every
backend (autodiff would run the two backward matmuls with a float32 operand, i.e. in float32):
that is the mixed-precision policy, not a workaround for one compiler.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any


@dataclasses.dataclass(frozen=True)
class Tuning:
    """The per-backend answers the math modules ask for."""

    written_out_norm_backward: bool
    written_out_attention_backward: bool
    constant_rotary_tables: bool
    loss_chunk_budget: int  # logits elements per chunk of the fused head + loss (loss.py)


CPU = Tuning(
    written_out_norm_backward=True,
    written_out_attention_backward=True,
    constant_rotary_tables=True,
    loss_chunk_budget=2**22,  # 16 MiB of float32: fastest measured for configs/small.py
)
ACCELERATOR = Tuning(
    written_out_norm_backward=False,
    written_out_attention_backward=False,
    constant_rotary_tables=False,
    loss_chunk_budget=2**28,  # 1 GiB of float32: large matmuls (not yet measured)
)

_planning: list[str] = []  # a backend set by `planning_for`, innermost last


def backend() -> str:
    """The backend the decisions are made for: `planning_for`'s, else JAX's default."""
    if _planning:
        return _planning[-1]
    import jax

    return jax.default_backend()


def current(backend_name: str | None = None) -> Tuning:
    """The decisions for `backend_name` (default: `backend()`)."""
    return CPU if (backend_name or backend()) == "cpu" else ACCELERATOR


@contextlib.contextmanager
def planning_for(backend_name: str) -> Iterator[None]:
    """Within the block, trace for `backend_name` ("gpu", "tpu", "cpu") whatever JAX runs on.
    JAX caches a function's traces without this setting in the key: trace for another backend
    with a function object not traced outside the block (a new `jax.jit`, as the trainer's
    compile functions make)."""
    _planning.append(backend_name)
    try:
        yield
    finally:
        _planning.pop()


def normalizer(norm_type: str, formula: Callable) -> Callable:
    """What `perijax.norms.Norm` normalizes with: the `formula` of `norm_type` (differentiated by
    autodiff), or, where this backend writes the norms' backward pass out, `cpu_kernels`' version
    of it (the same values)."""
    if not current().written_out_norm_backward:
        return formula
    from perijax.tuning import cpu_kernels

    return cpu_kernels.NORMALIZE[norm_type]


def compiler_options() -> dict[str, Any] | None:
    """`compiler_options` for the model's jitted steps (None: XLA's defaults)."""
    if _planning and _planning[-1] != "cpu":
        return None
    from perijax.tuning import cpu_compiler

    return cpu_compiler.step_compiler_options()


def host_tuned() -> bool:
    """Whether `tune_host` changed the allocator in this process."""
    from perijax.tuning import cpu_malloc

    return cpu_malloc.is_tuned()


def tune_host() -> bool:
    """Host allocator settings for CPU runs; call first thing in a program (`cpu_malloc`)."""
    from perijax.tuning import cpu_malloc

    return cpu_malloc.tune_malloc()
