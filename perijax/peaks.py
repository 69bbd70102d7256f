"""Peak throughput for MFU: the dense bfloat16 peak per chip of known GPUs and TPUs
(`ACCELERATORS`, matched by jax's `device_kind`; `perijax plan` reads their memory too), and on
CPU the best dense-matmul throughput this machine reaches, measured. `perijax bench` divides its
model FLOP/s by it (docs/performance.md).
"""

from __future__ import annotations

import functools
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

Log = Callable[[str], None]

# name: (HBM per chip in GiB, dense bfloat16 peak TFLOP/s per chip)
ACCELERATORS: dict[str, tuple[float, float]] = {
    "tpu-v4": (32, 275),
    "tpu-v5e": (16, 197),
    "tpu-v5p": (95, 459),
    "tpu-v6e": (32, 918),
    "a100-80gb": (80, 312),
    "h100": (80, 989),
    "h200": (141, 989),
}

GIB = 1024**3


# jax `device_kind` -> the ACCELERATORS entry whose dense bfloat16 peak per chip is
# used. First match wins. Parts with other clocks or power limits (H100 PCIe, NVL) map to None:
# their peak is not in the table, so pass --peak-tflops.
DEVICE_KINDS: tuple[tuple[str, str | None], ...] = (
    (r"H100.*(PCIe|NVL)|H200.*NVL", None),
    (r"H100|GH200", "h100"),  # "NVIDIA H100 80GB HBM3" (SXM), "NVIDIA GH200 480GB"
    (r"H200", "h200"),
    (r"A100", "a100-80gb"),  # 312 TFLOP/s for the 40 and 80 GB parts alike
    (r"^TPU v4$", "tpu-v4"),
    (r"^TPU v5 ?(lite|e)", "tpu-v5e"),  # "TPU v5 lite"
    (r"^TPU v5p?$", "tpu-v5p"),
    (r"^TPU v6 ?(lite|e)", "tpu-v6e"),  # "TPU v6 lite"
)


# CPU peak: square matmuls in each precision XLA:CPU offers (name, input dtype, result dtype).
MATMUL_PRECISIONS: tuple[tuple[str, str, str], ...] = (
    ("float32", "float32", "float32"),
    ("bfloat16->float32", "bfloat16", "float32"),  # bf16 inputs, f32 accumulation and result
    ("bfloat16", "bfloat16", "bfloat16"),
)


PEAK_SIZES = (2048, 4096)


PEAK_REPEATS = 5


# ------------------------------------------------------------------------------------- peaks
def accelerator_peak(device_kind: str) -> str | None:
    """The ACCELERATORS name for a jax `device_kind`, or None if unknown."""
    for pattern, name in DEVICE_KINDS:
        if re.search(pattern, device_kind):
            return name
    return None


def measure_matmul_peak(
    sizes: Sequence[int] = PEAK_SIZES,
    shapes: Sequence[tuple[int, int, int]] = (),
    repeats: int = PEAK_REPEATS,
    device: Any = None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Best dense-matmul throughput of `device` (default: the first local one): the median of
    `repeats` timed, jitted [m, k] x [k, n] products per shape and precision, compiled with
    XLA's default options (so no step option can lower it); the best median wins. The shapes
    are the n x n x n squares of `sizes` and `shapes` (m, k, n): `bench` passes the model's own
    weight matmuls, which on some CPUs run faster than any square."""

    import jax
    import jax.numpy as jnp

    device = device or jax.local_devices()[0]
    candidates = [((n, n, n), "square") for n in sizes]
    candidates += [(tuple(s), "model") for s in dict.fromkeys(map(tuple, shapes))]
    runs = []
    for i, ((m, k, n), source) in enumerate(candidates):
        if log and i and i % 4 == 0:
            log(f"matmul peak: shape {i + 1}/{len(candidates)}")
        for name, in_dtype, out_dtype in MATMUL_PRECISIONS:
            keys = jax.random.split(jax.random.key(m * k + n), 2)
            a, b = (
                jax.device_put(jax.random.normal(key, dims, jnp.float32).astype(in_dtype), device)
                for key, dims in zip(keys, ((m, k), (k, n)), strict=True)
            )
            matmul = jax.jit(
                functools.partial(jnp.matmul, preferred_element_type=jnp.dtype(out_dtype))
            )
            matmul(a, b).block_until_ready()  # compile and warm up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                matmul(a, b).block_until_ready()
                times.append(time.perf_counter() - t0)
            median = statistics.median(times)
            runs.append(
                {
                    "shape": [m, k, n],
                    "source": source,
                    "precision": name,
                    "median_s": median,
                    "tflops": 2 * m * k * n / median / 1e12,
                }
            )
            del a, b
    best = max(runs, key=lambda r: r["tflops"])
    return {
        "tflops": best["tflops"],
        "precision": best["precision"],
        "shape": best["shape"],
        "runs": runs,
    }


def resolve_peak(
    platform_name: str,
    device_kind: str,
    num_devices: int,
    *,
    no_peak: bool,
    peak_tflops: float | None,
    sizes: Sequence[int],
    log: Log,
    shapes: Sequence[tuple[int, int, int]] = (),
) -> dict[str, Any]:
    """The peak MFU is computed against: `tflops` per unit (a chip; on CPU a process, whose fake
    devices share its cores) and `tflops_total` for the whole run. On CPU it is measured on the
    squares of `sizes` and on `shapes` (the model's weight matmuls, see measure_matmul_peak)."""
    import jax

    per_process = platform_name == "cpu"
    units = jax.process_count() if per_process else num_devices
    peak: dict[str, Any] = {
        "source": "none",
        "unit": "process" if per_process else "device",
        "tflops": None,
        "tflops_total": None,
        "precision": None,
    }
    if no_peak:
        return peak
    if peak_tflops is not None:
        peak.update(source="--peak-tflops", tflops=peak_tflops)
    elif per_process:
        log(
            f"measuring the CPU matmul peak (squares {', '.join(map(str, sizes))} and "
            f"{len(shapes)} shapes of the model's matmuls)..."
        )
        measured = measure_matmul_peak(sizes, shapes, log=log)
        peak.update(
            source="measured",
            tflops=measured["tflops"],
            precision=f"{measured['precision']} matmul {'x'.join(map(str, measured['shape']))}",
            matmul=measured["runs"],
        )
    else:
        name = accelerator_peak(device_kind)
        if name is None:
            log(f"no peak known for device kind {device_kind!r}: pass --peak-tflops for MFU")
            return peak
        peak.update(source=f"table:{name}", tflops=float(ACCELERATORS[name][1]), precision="bf16")
    peak["tflops_total"] = peak["tflops"] * units
    return peak
