"""Graceful stop on SIGTERM/SIGINT: the training loop finishes its step, checkpoints and exits 0;
a second signal exits at once.

The `perijax` command blocks both signals in every thread before JAX starts its own threads and
receives them in one dedicated thread (`signal.sigwait`). A signal delivered to an arbitrary
XLA or collective-communication thread can interrupt a system call there and stall a step (seen
with jax.distributed under SLURM); blocked everywhere, it can only be taken by the waiting
thread. Library callers that did not install the thread get ordinary Python handlers instead.
"""

from __future__ import annotations

import os
import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # signals taken by the waiting thread
_watchers = 0  # how many StopSignal contexts are open (a loop that can still save)
_thread: threading.Thread | None = None


def install_signal_thread() -> None:
    """Blocks SIGTERM/SIGINT in this and every later thread and starts the waiting thread.
    Call before JAX starts (threads inherit the mask of the thread that creates them)."""
    global _thread
    if _thread is not None:
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)

    def wait() -> None:
        while True:
            signum = signal.sigwait(SIGNALS)
            if _received or not _watchers:  # a second signal, or nothing to save yet
                os._exit(128 + signum)
            _received.append(signum)

    _thread = threading.Thread(target=wait, name="perijax-signals", daemon=True)
    _thread.start()


class StopSignal:
    """Context for the training loop: `received` is the first SIGTERM/SIGINT, if any."""

    def __init__(self) -> None:
        self._received: int | None = None
        self._previous: dict = {}

    @property
    def received(self) -> int | None:
        return _received[0] if _thread is not None and _received else self._received

    def __enter__(self) -> StopSignal:
        global _watchers
        if not _watchers:
            _received.clear()
        _watchers += 1
        if _thread is None:
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        global _watchers
        _watchers -= 1
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self._received is not None:
            os._exit(128 + signum)
        self._received = signum
