"""perijax.tuning.cpu_malloc: XLA:CPU's per-step temporaries stay mapped between executions once
`tune_malloc()` is applied, and the settings apply only where they should."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from perijax.tuning import cpu_malloc as hostmem

# A jitted function whose 256 MiB temporary (the [8192, 8192] float32 `x @ x.T`) XLA allocates
# and frees on every call; minor page faults per call tell whether the pages were reused.
SCRIPT = textwrap.dedent(
    """
    import json, resource, sys
    from perijax.tuning import cpu_malloc as hostmem
    hostmem.RELEASE_MIN_BYTES = 1 << 50  # the allocator settings alone (the releaser is below)
    applied = hostmem.tune_malloc()
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: (x @ x.T) @ x)
    x = jnp.ones((8192, 64), jnp.float32) / 64
    temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
    jax.block_until_ready(f(x))
    jax.block_until_ready(f(x))
    libc = hostmem._glibc()
    heap_before = libc.mallinfo2().arena
    faults = []
    for _ in range(CALLS):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        jax.block_until_ready(f(x))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    growth = libc.mallinfo2().arena - heap_before
    print(json.dumps({"applied": applied, "faults": faults, "temp": temp, "growth": growth}))
    """
).replace("CALLS", "24")
TEMP_PAGES = 8192 * 8192 * 4 // 4096


def _python(script: str, tune: str, timeout: int = 300) -> str:
    """Runs `script` in a fresh interpreter with PERIJAX_TUNE_MALLOC=`tune`; returns its stdout."""
    env = {**os.environ, hostmem.ENV: tune, "JAX_PLATFORMS": "cpu"}
    env.pop("XLA_FLAGS", None)
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def _run(tune: str) -> dict:
    return json.loads(_python(SCRIPT, tune).strip().splitlines()[-1])


@pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc on Linux")
def test_tuned_malloc_reuses_the_temporaries_pages():
    default = _run("0")
    tuned = _run("1")
    assert not default["applied"] and tuned["applied"]
    assert default["temp"] >= TEMP_PAGES * 4096
    # Untuned, every call faults the 65,536 pages of its temporary in again ...
    assert min(default["faults"]) > 0.5 * TEMP_PAGES, default
    # ... tuned, a call faults only when the heap grows, and most calls find the pages mapped.
    # (Some calls still grow it: XLA can free a temporary just after the call's outputs are
    # ready, after the next call has allocated its own, and the heap grows by one more block
    # each time that happens until its free blocks cover the overlap; how often depends on the
    # threads' timing, so on the machine's load.)
    calls = len(tuned["faults"])
    # (Untuned, the heap does not grow at all while each call faults its whole temporary in.)
    assert sum(tuned["faults"]) * 4096 <= 1.1 * tuned["growth"] + calls * 64 * 4096, tuned
    assert sum(f > 0.05 * TEMP_PAGES for f in tuned["faults"]) <= calls // 2, tuned


def test_runs_on_cpu_follows_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert hostmem.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not hostmem.runs_on_cpu()
    monkeypatch.setenv("JAX_PLATFORMS", " CPU ")
    assert hostmem.runs_on_cpu()


def test_tune_malloc_off_switch_and_bad_value(monkeypatch, capsys):
    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setattr(hostmem, "_glibc", lambda: pytest.fail("must not touch malloc when off"))
    monkeypatch.setenv(hostmem.ENV, "0")
    assert hostmem.tune_malloc() is False
    monkeypatch.setattr(hostmem, "_applied", None)
    monkeypatch.setattr(hostmem, "_glibc", lambda: None)  # not glibc: nothing to tune
    monkeypatch.setenv(hostmem.ENV, "yes")
    assert hostmem.tune_malloc() is False
    assert "ignoring PERIJAX_TUNE_MALLOC='yes' (expected 0 or 1)" in capsys.readouterr().err


RELEASE_SCRIPT = textwrap.dedent(
    """
    import json, time
    from perijax.tuning import cpu_malloc as hostmem
    hostmem.RELEASE_WINDOW_S = 1.0
    assert hostmem.tune_malloc()
    import numpy as np
    a = np.ones(192 << 20)  # 1.5 GiB from the (untrimmed) heap
    del a
    kept = hostmem._resident_bytes()
    time.sleep(3.0)
    print(json.dumps({"kept": kept, "later": hostmem._resident_bytes(),
                      "releases": hostmem._releaser.releases}))
    """
)


@pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc on Linux")
def test_freed_memory_beyond_recent_use_is_released():
    r = json.loads(_python(RELEASE_SCRIPT, "1", timeout=120).strip().splitlines()[-1])
    # Untrimmed, the freed 1.5 GiB stay resident; the releaser hands them back within seconds.
    assert r["releases"] >= 1, r
    assert r["kept"] - r["later"] > 1 << 30, r


def test_release_rule():
    gib = 1 << 30
    assert not hostmem.should_release(int(4.8 * gib), int(4.4 * gib))  # steady state
    assert not hostmem.should_release(int(9.0 * gib), int(4.4 * gib))  # late free: two blocks
    assert hostmem.should_release(int(11.5 * gib), int(4.4 * gib))  # more than 2.5x in use
    assert not hostmem.should_release(int(1.4 * gib), int(0.5 * gib))  # less than 1 GiB over
    assert hostmem.should_release(int(1.6 * gib), int(0.5 * gib))


def test_release_rule_with_a_needed_size():
    gib = 1 << 30
    assert hostmem.should_release(int(11.5 * gib), int(3 * gib), needed=0)
    assert not hostmem.should_release(int(11.5 * gib), int(3 * gib), needed=int(11 * gib))
    assert hostmem.should_release(int(12.5 * gib), int(3 * gib), needed=int(11 * gib))


def test_releaser_learns_what_the_workload_takes_back():
    """A release that the same phase undoes (the heap regrows to 90% of its size before) is not
    repeated at that size; a release that stays, or a new phase, keeps the plain rule."""
    gib = 1 << 30
    r = hostmem._Releaser(libc=None)
    clock = iter(i * hostmem.RELEASE_EVERY_S for i in range(100_000))

    def run(seconds, in_use, resident, trimmed=None):
        """Samples for `seconds` (the resident set drops to `trimmed` GiB after a release);
        returns how many times the releaser released."""
        releases = 0
        for _ in range(int(seconds / hostmem.RELEASE_EVERY_S)):
            if r.decide(next(clock), int(in_use * gib), int(resident * gib)):
                releases += 1
                resident = trimmed
        return releases

    assert run(5, 3, 8, trimmed=3.3) == 1  # 8 GiB resident, 3 in use: released once
    assert r.needed == 0 and r.pending == (8 * gib, 3 * gib)
    assert run(5, 3, 7.5) == 0 and r.needed == 8 * gib  # the loop took it back: learned
    assert run(60, 3, 8.5) == 0  # below 1.1 x 8 GiB: kept, however long
    assert run(5, 3, 11.5, trimmed=4) == 1 and r.needed == 8 * gib  # grew further: released
    assert run(10, 3, 11) == 0 and r.needed == 11.5 * gib  # ... and taken back again
    assert run(60, 3, 12) == 0
    # A new phase (a third of the memory in use) forgets that size once its window has passed.
    assert run(hostmem.RELEASE_WINDOW_S + 5, 1, 12, trimmed=1.2) == 1
    assert r.needed == 0 and r.pending is not None
    # A release that the workload does not take back leaves the plain rule in place.
    assert run(60, 1, 1.2) == 0 and r.needed == 0
    assert run(5, 1, 4, trimmed=1.2) == 1


SIGNAL_SCRIPT = textwrap.dedent(
    """
    import signal
    from perijax.tuning import cpu_malloc as hostmem
    assert hostmem.tune_malloc()
    def blocked(tid):
        with open(f"/proc/self/task/{tid}/status") as f:
            mask = int(next(l for l in f if l.startswith("SigBlk:")).split()[1], 16)
        return bool(mask >> (signal.SIGTERM - 1) & 1)
    print(blocked(hostmem._releaser.native_id), blocked(__import__("threading").get_native_id()))
    """
)


@pytest.mark.skipif(hostmem._glibc() is None, reason="needs glibc on Linux")
def test_releaser_thread_never_takes_sigterm():
    # The perijax command blocks SIGTERM everywhere but in the thread that waits for it
    # (perijax/signals.py); a thread started earlier with SIGTERM open would be killed by it.
    blocked = _python(SIGNAL_SCRIPT, "1", timeout=60).split()
    assert blocked == ["True", "False"]  # blocked there, the caller's mask untouched
