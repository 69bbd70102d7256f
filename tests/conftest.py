"""Test setup: 8 fake CPU devices (so sharding code paths are exercised) and a persistent
compilation cache (repeated CPU compiles are ~4x faster). Both must be set before jax starts;
they are environment variables so that subprocesses started by tests inherit them. The embedded
corpus is prepared once per session (`data_cache`)."""

import os
import tempfile

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip()
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), "perijax-jax-cache")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> str:
    """A data cache folder shared by the tests that train on the embedded corpus (its tokenizer
    is trained once)."""
    return str(tmp_path_factory.mktemp("perijax-cache"))
