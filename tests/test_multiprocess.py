"""Two local processes (4 fake CPU devices each, jax.distributed over 127.0.0.1) train together
and match one process with 8 devices; each process loads only its own rows of every batch.
Decisions that need every process (clock-based saves, stopping) are agreed, and the loop issues
no host collective on ordinary steps."""

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from perijax import config as config_lib
from perijax import train as train_lib

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
    "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "model.dtype": "float32", "train.global_batch_size": "16", "train.total_steps": "5",
    "train.log_every_steps": "1", "train.eval_every_steps": "0", "train.eval_batches": "1",
    "optim.warmup_steps": "0", "mesh.data": "2", "mesh.fsdp": "4",
}  # fmt: skip


def losses(workdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def launch(tmp_path: Path, overrides: dict, options: dict | None = None) -> subprocess.Popen:
    """Starts two mp_worker processes through `perijax launch-local`, in their own process
    group so that the test can end every one of them (`stop`)."""
    argv = [sys.executable, "-m", "perijax.cli", "launch-local", "-n", "2",
            "--devices-per-process", "4", "--", "python", "tests/mp_worker.py",
            str(tmp_path / "run"), str(tmp_path / "record"), json.dumps(overrides),
            json.dumps(options or {})]  # fmt: skip
    return subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip


def stop(proc: subprocess.Popen) -> None:
    """Kills the launcher and every worker it started (teardown: nothing may linger)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stop(proc)
        raise AssertionError("the processes did not finish (a collective mismatch hangs)") from e
    return out


def record(tmp_path: Path, rank: int) -> dict:
    return json.loads((tmp_path / "record" / f"rank{rank}.json").read_text())


def test_two_processes_train_like_one(tmp_path):
    multi = {**OVERRIDES, "mesh.dcn_data": "2"}  # data parallel across the two "hosts"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "launch-local", "-n", "2",
         "--devices-per-process", "4", "--", "python", "tests/mp_worker.py",
         str(tmp_path / "multi"), str(tmp_path / "rows"), json.dumps(multi)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[0] process 0/2 devices 4" in proc.stdout
    assert "[1] process 1/2 devices 4" in proc.stdout
    assert "[1] step" not in proc.stdout  # only process 0 logs

    cfg = config_lib.load(str(ROOT / "configs" / "tiny.py"), list(OVERRIDES.items()))
    train_lib.train(cfg, tmp_path / "single", log=lambda s: None)
    np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"), rtol=1e-5)

    # Each process loaded its half of every global batch: process p got rows p*8..p*8+7 of the
    # batch the single process trained on.
    from perijax import data as data_lib

    data = data_lib.open_datasets("synthetic", vocab_size=64, seed=cfg.train.seed, log=print)
    single = data.train_iterator(seq_len=16, global_batch_size=16, seed=cfg.train.seed)
    rank0, rank1 = (np.load(tmp_path / "rows" / f"rank{r}.npy") for r in (0, 1))
    assert rank0.shape == rank1.shape == (5, 8, 17)
    for step in range(5):
        np.testing.assert_array_equal(np.concatenate([rank0[step], rank1[step]]), next(single))


SKEWED = {
    **OVERRIDES, "mesh.dcn_data": "2", "train.total_steps": "12", "train.log_every_steps": "4",
    "checkpoint.every_steps": "0", "checkpoint.every_minutes": "1e-9", "checkpoint.keep": "0",
}  # fmt: skip


@pytest.mark.slow
def test_clock_based_saves_are_agreed_and_no_step_blocks_on_a_collective(tmp_path):
    """Process 1's checkpoint clock stands still, so by its own clock a save is never due while
    process 0's (every_minutes=1e-9) always is. Saves are collectives: if each process decided
    alone, the run would hang. Process 0 decides and both save the same steps."""
    proc = launch(tmp_path, SKEWED, {"frozen_clock_rank": 1})
    try:
        out = finish(proc)
    finally:
        stop(proc)
    assert proc.returncode == 0, out[-4000:]
    rank0, rank1 = record(tmp_path, 0), record(tmp_path, 1)
    # Agreements start at the log steps 4 and 8 and are read one step later; 12 is the last.
    assert rank0["saves"] == rank1["saves"] == [5, 9, 12]
    assert sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir()) == [5, 9, 12]

    # Host collectives per step: the loop's one agreement at each log step and nothing else,
    # apart from Orbax's own at the save steps.
    for rec in (rank0, rank1):
        per_step: list[list[str]] = []
        for event in rec["trace"]:
            if event == "step":
                per_step.append([])
            elif per_step:
                per_step[-1].append(event)
        assert len(per_step) == 12
        for step, events in enumerate(per_step, start=1):
            if step not in rec["saves"]:
                assert events == (["agree"] if step % 4 == 0 else []), (step, events)


@pytest.mark.slow
def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    overrides = {
        **OVERRIDES, "mesh.dcn_data": "2", "train.total_steps": "100000",
        "train.log_every_steps": "5", "checkpoint.every_steps": "0",
    }  # fmt: skip
    proc = launch(tmp_path, overrides)
    lines: list[str] = []
    try:
        pids = {}
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("[1] pid "):
                pids[1] = int(line.split()[2])
            if line.startswith("[0] step") and 1 in pids:
                os.kill(pids[1], signal.SIGTERM)  # the process that does not log
                break
        else:
            raise AssertionError("the run ended before its first logged step:\n" + "".join(lines))
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        proc.wait(timeout=300)
        reader.join(timeout=30)
    finally:
        stop(proc)
    out = "".join(lines)
    assert proc.returncode == 0, out[-4000:]
    rank0, rank1 = record(tmp_path, 0), record(tmp_path, 1)
    assert rank0["preempted"] and rank1["preempted"], out[-4000:]
    assert rank0["step"] == rank1["step"] < 100000
    assert rank0["saves"] == rank1["saves"] == [rank0["step"]]
    assert (tmp_path / "run" / "checkpoints" / str(rank0["step"]) / "state").is_dir()
    assert f"[0] stopped by a signal to another process: checkpoint {rank0['step']} saved" in out
