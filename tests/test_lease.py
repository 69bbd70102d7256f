"""One trainer per workdir (perijax/lease.py): a live holder refuses a second launch in one line
and the refused launch changes nothing; a holder whose process is gone, or whose heartbeat
stands still, is taken over; a holder whose lease was taken notices. The emulator versions:
tests/test_gcs.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from perijax import lease as lease_lib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fast(monkeypatch):
    monkeypatch.setattr(lease_lib, "HEARTBEAT_S", 0.2)


def record(**fields) -> str:
    base = {"host": "elsewhere", "pid": 1, "started": "2026-01-01T00:00:00Z", "token": "t",
            "heartbeat": 7, "beat_at": "2026-01-01T00:00:00Z"}  # fmt: skip
    return json.dumps({**base, **fields})


def test_a_live_holder_refuses_a_second_lease(tmp_path, fast):
    notes = []
    with lease_lib.acquire(tmp_path, notes.append) as held:
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == held.record["token"]
        with pytest.raises(lease_lib.LeaseError) as e:
            lease_lib.acquire(tmp_path, notes.append, stale_s=5, poll_s=0.05)
        message = str(e.value)
        assert f"is in use by pid {os.getpid()} on host {socket.gethostname()}" in message
        assert "heartbeat advanced" in message and "\n" not in message
        assert not held.lost
    assert not (tmp_path / "lease.json").exists() and notes == []  # released on exit


def test_a_dead_holder_on_this_host_is_taken_over_at_once(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)  # fmt: skip
    dead = int(done.stdout)
    (tmp_path / "lease.json").write_text(record(host=socket.gethostname(), pid=dead))
    notes = []
    t0 = time.monotonic()
    with lease_lib.acquire(tmp_path, notes.append, stale_s=60) as held:
        assert time.monotonic() - t0 < 5  # no waiting for a heartbeat
        assert held.record["pid"] == os.getpid()
    assert len(notes) == 1 and f"pid {dead} on host" in notes[0] and "process is gone" in notes[0]


def test_a_still_heartbeat_is_taken_over_after_the_stale_time(tmp_path):
    (tmp_path / "lease.json").write_text(record())  # another host: its pid cannot be checked
    notes = []
    t0 = time.monotonic()
    with lease_lib.acquire(tmp_path, notes.append, stale_s=1.0, poll_s=0.1) as held:
        assert time.monotonic() - t0 >= 1.0
        assert json.loads((tmp_path / "lease.json").read_text())["token"] == held.record["token"]
    assert len(notes) == 1 and "no heartbeat for 1 s" in notes[0] and "elsewhere" in notes[0]


def test_a_holder_whose_lease_was_taken_notices(tmp_path, fast):
    held = lease_lib.acquire(tmp_path, lambda s: None)
    (tmp_path / "lease.json").write_text(record(token="theirs"))
    deadline = time.monotonic() + 5
    while not held.lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert held.lost and "pid 1 on host elsewhere" in held.lost
    held.release()
    assert json.loads((tmp_path / "lease.json").read_text())["token"] == "theirs"  # not ours


@pytest.mark.slow
def test_a_concurrent_train_is_refused_and_a_killed_one_is_resumed(tmp_path):
    """Two `perijax train` on one workdir: the second stops in one line naming the first and
    writes nothing; after SIGKILL of the first, a relaunch takes the lease over and finishes."""
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "perijax.cli", "train", "--config", "configs/tiny.py",
            "--workdir", str(workdir), "--config.train.total_steps=400",
            "--config.checkpoint.every_steps=10", "--config.train.log_every_steps=1"]  # fmt: skip
    out = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                             start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: "compiled and ran the first step" in (tmp_path / "first.log").read_text())
        before = sorted(p.name for p in workdir.iterdir())
        second = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert second.returncode == 2, second.stderr
        errors = second.stderr.strip().splitlines()
        assert len(errors) == 1, second.stderr
        assert f"is in use by pid {first.pid} on host" in errors[0]
        assert "config_history.jsonl" not in os.listdir(workdir)
        assert sorted(p.name for p in workdir.iterdir()) == before
        ckpts = workdir / "checkpoints"
        wait_for(lambda: ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()))
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        out.close()
    assert json.loads((workdir / "lease.json").read_text())["pid"] == first.pid  # left behind
    latest = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    total = latest + 5
    again = subprocess.run([*args, f"--config.train.total_steps={total}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"note: taking over the lease of pid {first.pid}" in again.stdout
    assert f"resumed from {workdir}/checkpoints/{latest}" in again.stdout
    assert f"done: step {total}" in again.stdout and not (workdir / "lease.json").exists()


def wait_for(condition, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)
