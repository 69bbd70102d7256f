"""One trainer per workdir: `perijax train` holds an exclusive lease, WORKDIR/lease.json, while
it runs (docs/checkpointing.md, "One trainer per workdir").

The lease is created exclusively: `open(..., "x")` on a local path, an upload with the
precondition "no such object yet" (`ifGenerationMatch=0`) on `gs://`. It records the holder's
host, pid, start time, a token and a heartbeat counter that a background thread advances every
`HEARTBEAT_S` seconds. A launch that finds a lease:

- held by a process of this host that no longer exists (SIGKILL, a crash): takes it over at once;
- otherwise watches it: a heartbeat that advances means a live holder, and the launch is refused
  in one line naming it (within one heartbeat, ~10 s); a heartbeat that stays still for
  `STALE_S` seconds, by this process's own clock (hosts' clocks may differ), means the holder or
  its machine is gone, and the launch takes the lease over with a one-line note. A requeued SLURM
  job or a restarted TPU VM therefore resumes without a human, at most `STALE_S` later.

Taking over deletes the stale lease and creates a new one exclusively; of two launches racing
for it one wins, and a holder whose lease was taken (its token is no longer in the file) stops
before its next save (`Lease.lost`). A refused launch writes nothing.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

from perijax import storage
from perijax.config import ConfigError

NAME = "lease.json"
HEARTBEAT_S = 10.0
STALE_S = 30.0


class LeaseError(RuntimeError):
    """The workdir is held by another trainer; the message is one line."""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


# -------------------------------------------------------------------------------- the file
def _create(path: Any, text: str) -> bool:
    """Creates `path` holding `text` if it does not exist; False if it does."""
    if storage.is_url(path):
        import fsspec

        fs, _, (target,) = fsspec.get_fs_token_paths(str(path))
        try:
            protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
            if "gs" in protocols:
                fs.pipe_file(target, text.encode(), mode="create")  # ifGenerationMatch=0
            else:  # no precondition: create-if-absent, then confirmed by `_confirm`
                if fs.exists(target):
                    return False
                fs.pipe_file(target, text.encode())
        except FileExistsError:
            return False
        except OSError as e:  # gcsfs: HTTP 412 precondition failed
            if "412" in str(e) or "recondition" in str(e):
                return False
            raise
        return True
    try:
        with open(path, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    except FileExistsError:
        return False
    return True


def _read(path: Any) -> dict | None:
    try:
        return json.loads(storage.as_path(path).read_text())
    except ValueError:
        return None
    except OSError as e:
        if storage.is_missing(e):
            return None
        raise


def _write(path: Any, text: str) -> None:
    p = storage.as_path(path)
    if storage.is_url(path):
        p.write_text(text)
        return
    tmp = p.with_name(f".{p.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, p)


def _delete(path: Any) -> None:
    try:
        storage.as_path(path).unlink()
    except OSError as e:
        if not storage.is_missing(e):
            raise


def describe(holder: dict) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')})"


# ------------------------------------------------------------------------------- the lease
class Lease:
    """This process's lease on a workdir; `release()` (or the `with` block's end) gives it up."""

    def __init__(self, path: Any, record: dict):
        self.path = path
        self.record = record
        self.lost: str | None = None  # why the lease is no longer ours, once it is not
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="perijax-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                held = _read(self.path)
                if not held or held.get("token") != self.record["token"]:
                    who = describe(held) if held else "nobody (the file is gone)"
                    self.lost = f"the workdir's lease is now held by {who}"
                    return
                self.record = {**self.record, "heartbeat": self.record["heartbeat"] + 1,
                               "beat_at": _now()}  # fmt: skip
                _write(self.path, json.dumps(self.record))
            except Exception:  # a storage hiccup (OSError, a client's retry error): next beat
                continue

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=max(HEARTBEAT_S, 5.0))
        if self.lost:
            return
        held = _read(self.path)
        if held and held.get("token") == self.record["token"]:
            _delete(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def acquire(
    workdir: Any,
    log: Callable[[str], None] = print,
    *,
    stale_s: float = STALE_S,
    poll_s: float = 1.0,
) -> Lease:
    """Takes WORKDIR's lease (creating WORKDIR), or raises LeaseError naming its live holder."""
    workdir = storage.as_path(workdir)
    path = workdir / NAME
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        return _acquire(workdir, path, log, stale_s, poll_s)
    except OSError as e:
        raise ConfigError(f"cannot write to workdir {workdir}: {e.strerror or e}") from e


def _acquire(workdir: Any, path: Any, log, stale_s: float, poll_s: float) -> Lease:
    host, pid = socket.gethostname(), os.getpid()
    record = {"host": host, "pid": pid, "started": _now(), "token": uuid.uuid4().hex,
              "heartbeat": 0, "beat_at": _now()}  # fmt: skip
    for _ in range(5):  # a lease that disappears or is retaken while we look: look again
        if _create(path, json.dumps(record)):
            # A taker deletes only the stale record it read, never a new one: this read only
            # confirms that the file is ours.
            held = _read(path)
            if held and held.get("token") == record["token"]:
                return Lease(path, record)
            continue
        holder = _read(path)
        if holder is None:
            continue
        if holder.get("host") == host and not _alive(int(holder.get("pid", -1))):
            log(f"note: taking over the lease of {describe(holder)}: that process is gone")
        else:
            state, why = _watch(path, holder, stale_s, poll_s)
            if state == "live":
                raise LeaseError(
                    f"workdir {workdir} is in use by {describe(holder)}: {why}; stop that run "
                    f"or use another --workdir ({path})"
                )
            if state == "gone":  # released while we watched: take it the normal way
                continue
            log(
                f"note: taking over the lease of {describe(holder)}: no heartbeat for "
                f"{stale_s:.0f} s (its process or machine is gone)"
            )
        if _read(path) == holder:
            _delete(path)
    raise LeaseError(f"workdir {workdir}: could not take its lease ({path}), another launch races")


def _watch(path: Any, holder: dict, stale_s: float, poll_s: float) -> tuple[str, str]:
    """("live", why) when `holder`'s heartbeat advances or the lease changes hands, ("gone", "")
    when it is released, ("stale", "") when it stays still for `stale_s` seconds of this
    process's clock."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < stale_s:
        time.sleep(poll_s)
        now = _read(path)
        if now is None:
            return "gone", ""
        if now.get("token") != holder.get("token"):
            return "live", "another launch took the lease"
        if now.get("heartbeat") != holder.get("heartbeat"):
            return "live", f"its heartbeat advanced to {now.get('heartbeat')}"
    return "stale", ""
