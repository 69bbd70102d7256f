"""Host allocator settings for training on CPU: keep XLA's buffers resident between steps.

XLA:CPU allocates each execution's temporaries (every activation the backward pass keeps: about
4.3 GiB per step for `configs/small.py`) as one `posix_memalign` block from one of its worker
threads, and frees it when the step ends. glibc serves a block that large with a fresh `mmap` and
returns it with `munmap`, so every step faults in and zeroes every page again, and the cost grows
with the activation memory, so a placement that keeps more activations (Peri-LN's two extra norms
per block) pays far more than its arithmetic (docs/performance.md has the counts and the time).

`tune_malloc()` makes glibc keep that memory instead, as GPU and TPU runtimes keep theirs:

- `M_ARENA_MAX = 1`: every thread allocates from the main heap. A per-thread arena can hold at
  most 64 MiB, so larger blocks from worker threads would go to `mmap` whatever else is set.
- `M_MMAP_MAX = 0`: no block is served by `mmap`; the main heap grows with `brk` instead.
- `M_TRIM_THRESHOLD = -1`: freed memory at the top of the heap is never returned to the kernel,
  so the next step reuses the same, already mapped pages.

The process then keeps its peak host memory; that peak can be twice the temporaries or more,
since XLA sometimes frees one step's block just after the next step has allocated its own
(glibc's default reaches the same peak for a moment, then unmaps it), and the heap grows by a
block each time that happens until its free blocks cover the overlap.

A daemon thread (`_Releaser`) bounds that: every half second it compares the process's anonymous
resident memory with the most memory the heap has had in use over the last 30 s; when the first
exceeds the second by more than 1.5 times the second (and by 1 GiB), it calls `malloc_trim(0)`,
which hands the free pages back, and then waits at least 30 s before it may release again. A heap
left over from a bigger phase goes. But a steady training loop can need that much: the freed
temporaries leave a hole that small allocations then split, so the next step's block no longer
fits and the heap grows by another block, until there are enough holes (four blocks for
`configs/small.py`). A release there is undone within a few steps, each faulting its block in
again, and repeated every 30 s it slowed training (docs/performance.md). So the releaser
learns: when the resident set climbs back to 90% of what it was before a release while the
recent peak in use stays within a factor 4/3 of its value then (the same phase of the program),
that size is needed, and it releases again only above 1.1 times it. A change of phase (the peak
in use moves further) forgets it. Half-second samples can miss the peak of a very short step. The
thread blocks the asynchronous signals, so that SIGTERM/SIGINT reach the thread that waits for them
(perijax/signals.py). Without `mallinfo2` (glibc < 2.33) nothing is tuned.

The settings must be made before any other thread allocates (threads that already own an arena
keep it), so the `perijax` command applies them first thing; library users call `tune_malloc()` at
the top of their program. They are applied only where they help and are known to work: glibc on
Linux, when JAX will run on CPU. `PERIJAX_TUNE_MALLOC=0` turns them off, `=1` forces them.
"""

from __future__ import annotations

import collections
import ctypes
import importlib.metadata
import os
import signal
import sys
import threading
import time

ENV = "PERIJAX_TUNE_MALLOC"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Distributions that give JAX an accelerator backend (then JAX does not run on CPU by default).
_ACCELERATOR_PLUGINS = ("jax-cuda", "jax_cuda", "libtpu", "jax-rocm", "jax_rocm")

_applied: bool | None = None

# Signals the releaser thread never takes (everything but the synchronous, fault-type ones).
_ASYNC_SIGNALS = signal.valid_signals() - {
    signal.SIGSEGV,
    signal.SIGBUS,
    signal.SIGFPE,
    signal.SIGILL,
    signal.SIGABRT,
    signal.SIGTRAP,
}

RELEASE_EVERY_S = 0.5
RELEASE_WINDOW_S = 30.0  # how long a peak of heap use counts as "recent"
RELEASE_SLACK = 1.5  # release when resident > (1 + slack) x recent peak in use ...
RELEASE_MIN_BYTES = 1 << 30  # ... and by at least this much
UNDONE_FRACTION = 0.9  # a release is undone when the resident set regrows to this share of before
NEEDED_MARGIN = 1.1  # after an undone release, release only above this multiple of that size
SAME_PHASE = 4 / 3  # recent peaks in use within this factor belong to the same phase


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()
        )
    ]


def should_release(resident: int, recent_peak_in_use: int, needed: int = 0) -> bool:
    """The release rule: the resident set exceeds the recent peak of heap memory in use by more
    than RELEASE_SLACK of it and by at least RELEASE_MIN_BYTES, and exceeds NEEDED_MARGIN times
    `needed` (what the workload regrew to after an earlier release; 0: nothing learned)."""
    excess = resident - recent_peak_in_use
    return (
        excess > RELEASE_SLACK * recent_peak_in_use
        and excess >= RELEASE_MIN_BYTES
        and resident > NEEDED_MARGIN * needed
    )


def _same_phase(peak: int, reference: int) -> bool:
    return reference / SAME_PHASE <= peak <= reference * SAME_PHASE


def _resident_bytes() -> int:
    """Anonymous resident memory (the heap, stacks, Python's arenas): the resident set less its
    file-backed and shared pages, which the heap never holds (the libraries alone are ~0.5 GiB)."""
    with open("/proc/self/statm") as f:
        _, resident, shared = (int(v) for v in f.read().split()[:3])
    return (resident - shared) * os.sysconf("SC_PAGE_SIZE")


class _Releaser(threading.Thread):
    """Samples heap use and the resident set; trims when `should_release` says so."""

    def __init__(self, libc: ctypes.CDLL):
        super().__init__(name="perijax-malloc-release", daemon=True)
        self.libc = libc
        self.samples: collections.deque[tuple[float, int]] = collections.deque()
        self.releases = 0
        self.last_release = -float("inf")
        self.pending: tuple[int, int] | None = None  # (resident before, peak) of the last release
        self.needed = 0  # resident size the workload regrew to after a release (0: none) ...
        self.needed_peak = 0  # ... in the phase with this recent peak in use

    def start(self) -> None:
        # A thread inherits its creator's signal mask: block the asynchronous signals while
        # creating it, so that none is ever delivered here.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _ASYNC_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def decide(self, now: float, in_use: int, resident: int) -> bool:
        """Takes one sample (time, heap bytes in use, resident bytes); returns whether to
        release now, and if so counts the release."""
        self.samples.append((now, in_use))
        while self.samples[0][0] < now - RELEASE_WINDOW_S:
            self.samples.popleft()
        peak = max(used for _, used in self.samples)
        if self.pending is not None:
            before, pending_peak = self.pending
            if not _same_phase(peak, pending_peak):
                self.pending = None
            elif resident >= UNDONE_FRACTION * before:  # the workload took it back
                self.needed, self.needed_peak, self.pending = before, pending_peak, None
        if self.needed and not _same_phase(peak, self.needed_peak):
            self.needed = 0
        cooled = now - self.last_release >= RELEASE_WINDOW_S
        if not (cooled and should_release(resident, peak, self.needed)):
            return False
        self.releases += 1
        self.last_release = now
        self.pending = (resident, peak)
        return True

    def run(self) -> None:
        while True:
            time.sleep(RELEASE_EVERY_S)
            in_use = self.libc.mallinfo2().uordblks
            if self.decide(time.monotonic(), in_use, _resident_bytes()):
                self.libc.malloc_trim(0)


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()  # only glibc has it (not musl)
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.mallinfo2.restype = _MallInfo2  # glibc >= 2.33
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
        return libc
    except (OSError, AttributeError):
        return None


def runs_on_cpu() -> bool:
    """Whether JAX will use its CPU backend, decided without starting JAX: `JAX_PLATFORMS` if
    set (its first entry), otherwise whether no GPU/TPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith(_ACCELERATOR_PLUGINS):
            return False
    return True


def is_tuned() -> bool:
    """Whether `tune_malloc()` has applied the settings in this process."""
    return bool(_applied)


def tune_malloc() -> bool:
    """Applies the settings above once per process if they apply here (see the module
    docstring); returns whether they are in effect."""
    global _applied
    if _applied is not None:
        return _applied
    choice = os.environ.get(ENV, "").strip()
    if choice not in ("", "0", "1"):
        print(f"perijax: ignoring {ENV}={choice!r} (expected 0 or 1)", file=sys.stderr)
        choice = ""
    wanted = choice == "1" or (choice == "" and runs_on_cpu())
    libc = _glibc() if wanted else None
    _applied = False
    if libc is not None:
        _applied = all(
            libc.mallopt(param, value) == 1
            for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
        )
    if _applied:
        global _releaser
        _releaser = _Releaser(libc)
        _releaser.start()
    return _applied


_releaser: _Releaser | None = None
