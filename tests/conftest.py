"""Test setup: 8 fake CPU devices (so sharding code paths are exercised) and a persistent
compilation cache (repeated CPU compiles are ~4x faster). Both must be set before jax starts."""

import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()

import jax  # noqa: E402

jax.config.update(
    "jax_compilation_cache_dir",
    os.environ.get(
        "PERIJAX_TEST_COMPILE_CACHE", os.path.join(tempfile.gettempdir(), "perijax-jax-cache")
    ),
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
