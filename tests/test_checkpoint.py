"""Checkpoints: exact resume, preemption by SIGTERM, crash safety under SIGKILL, restore onto
other meshes, the divergence guard, and clear errors."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from perijax import cli
from perijax import config as config_lib
from perijax import data as data_lib
from perijax import step as step_lib
from perijax import train as train_lib
from perijax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
    "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "model.dtype": "float32", "train.global_batch_size": "8", "train.total_steps": "8",
    "train.log_every_steps": "1", "train.eval_every_steps": "0", "train.eval_batches": "1",
    "optim.warmup_steps": "2", "checkpoint.every_steps": "0",
}  # fmt: skip


def config(**overrides):
    return config_lib.load(str(ROOT / "configs" / "tiny.py"), list({**BASE, **overrides}.items()))


def rows(workdir: Path) -> list[dict]:
    return [json.loads(line) for line in (workdir / "metrics.jsonl").open()]


def losses_by_step(workdir: Path) -> dict[int, float]:
    """Last logged loss per step (a crash can log a step twice; the resumed value wins)."""
    return {r["step"]: r["train/loss"] for r in rows(workdir) if "train/loss" in r}


def stop_at(step: int):
    """A log callback that delivers SIGTERM to this process once `step` has been logged."""

    def log(line: str) -> None:
        if line.startswith("step") and int(line.split()[1].split("/")[0]) == step:
            os.kill(os.getpid(), signal.SIGTERM)

    return log


def params_of(result) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(result["state"].params)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    result = train_lib.train(config(), workdir, log=lambda s: None)
    return losses_by_step(workdir), params_of(result)


def test_stop_and_resume_is_bit_exact(tmp_path, straight):
    cfg = config()
    first = train_lib.train(cfg, tmp_path, log=stop_at(4))
    # Step 4's metrics are read (and logged) once step 5 is running: the stop lands at step 5.
    assert first["preempted"] and int(first["state"].step) == 5
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["5"]
    second = train_lib.train(cfg, tmp_path, log=lambda s: None)
    assert not second["preempted"]
    assert losses_by_step(tmp_path) == straight[0]  # every step, bit-exact, data order included
    for a, b in zip(params_of(second), straight[1], strict=True):
        np.testing.assert_array_equal(a, b)


def _start(workdir: Path, total: int, every: int) -> subprocess.Popen:
    overrides = {**BASE, "train.total_steps": str(total), "checkpoint.every_steps": str(every)}
    args = [f"--config.{k}={v}" for k, v in overrides.items()]
    return subprocess.Popen(
        [sys.executable, "-m", "perijax.cli", "train", "--workdir", str(workdir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip


def _wait_for_step(proc: subprocess.Popen, step: int) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= step:
            return lines
    raise AssertionError(f"run ended before step {step}:\n" + "".join(lines))


@pytest.fixture(scope="module")
def long_straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("long")
    train_lib.train(config(**{"train.total_steps": "100"}), workdir, log=lambda s: None)
    return losses_by_step(workdir)


def test_sigterm_saves_and_exits_zero_then_resumes_exactly(tmp_path, long_straight):
    proc = _start(tmp_path, total=100, every=0)
    _wait_for_step(proc, 5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = [int(p.name) for p in (tmp_path / "checkpoints").iterdir()]
    assert len(saved) == 1 and 5 <= saved[0] < 100
    assert f"checkpoint {saved[0]} saved" in out
    train_lib.train(config(**{"train.total_steps": "100"}), tmp_path, log=lambda s: None)
    assert losses_by_step(tmp_path) == long_straight


@pytest.mark.parametrize("kill_after_step", [5, 15, 30])
def test_sigkill_during_async_saves_leaves_a_restorable_run(
    tmp_path, long_straight, kill_after_step
):
    proc = _start(tmp_path, total=100, every=2)  # an async save is in flight most of the time
    _wait_for_step(proc, kill_after_step)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    result = train_lib.train(config(**{"train.total_steps": "100"}), tmp_path, log=lambda s: None)
    assert int(result["state"].step) == 100
    resumed = losses_by_step(tmp_path)
    assert resumed == long_straight  # steps after the restored checkpoint were recomputed


@pytest.mark.parametrize("devices", [4, 1])
def test_fsdp_checkpoint_restores_on_fewer_devices(tmp_path, straight, devices):
    fsdp8 = config(**{"mesh.data": "1", "mesh.fsdp": "8"})
    train_lib.train(fsdp8, tmp_path, log=stop_at(4))
    smaller = config(**{"mesh.data": "1", "mesh.fsdp": "-1"})
    result = train_lib.train(smaller, tmp_path, log=lambda s: None, devices=jax.devices()[:devices])
    assert result["state"].params["embed"].get_value().sharding.mesh.size == devices
    got = losses_by_step(tmp_path)
    np.testing.assert_allclose(
        [got[s] for s in range(5, 9)], [straight[0][s] for s in range(5, 9)], rtol=1e-5
    )


def poison_batches(monkeypatch, bad_positions: set[int]):
    """Corrupt the batches at the given stream positions with out-of-vocabulary ids: the
    embedding gather then yields NaN, and so do the loss and the gradients."""
    make = data_lib.Datasets.train_iterator

    class Poisoned:
        def __init__(self, inner):
            self.inner, self.position = inner, 0

        def __next__(self):
            batch = next(self.inner)
            self.position += 1
            return np.full_like(batch, 10_000) if self.position in bad_positions else batch

        def get_state(self):
            return {"inner": self.inner.get_state(), "position": self.position}

        def set_state(self, state):
            self.inner.set_state(state["inner"])
            self.position = state["position"]

    monkeypatch.setattr(
        data_lib.Datasets, "train_iterator", lambda self, **kw: Poisoned(make(self, **kw))
    )


def test_nan_gradient_is_skipped_without_touching_parameters(tmp_path, monkeypatch):
    poison_batches(monkeypatch, {4})
    train_lib.train(config(), tmp_path, log=lambda s: None)
    by_step = {r["step"]: r for r in rows(tmp_path) if "train/loss" in r}
    assert by_step[4]["train/grad_norm"] == "nan"  # metrics.jsonl writes non-finite as strings
    assert by_step[4]["train/param_norm"] == by_step[3]["train/param_norm"]  # untouched
    assert by_step[5]["train/param_norm"] != by_step[4]["train/param_norm"]
    assert [by_step[s]["guard/skipped_steps"] for s in range(1, 9)] == [0, 0, 0, 1, 1, 1, 1, 1]


def test_repeated_nans_roll_back_and_skip_the_batches(tmp_path, monkeypatch):
    poison_batches(monkeypatch, {6, 7, 8})  # checkpoint at 4; three bad steps in a row
    cfg = config(**{
        "train.total_steps": "12", "checkpoint.every_steps": "4",
        "train.max_consecutive_bad_steps": "3",
    })  # fmt: skip
    result = train_lib.train(cfg, tmp_path, log=lambda s: None)
    assert int(result["state"].step) == 12
    logged = rows(tmp_path)
    assert any(r.get("guard/rollbacks") == 1 for r in logged)
    # After the rollback to step 4 the run continued with fresh batches: steps 5.. appear twice,
    # and the final rows are finite.
    assert sum(1 for r in logged if r["step"] == 5 and "train/loss" in r) == 2
    assert np.isfinite(losses_by_step(tmp_path)[12])


def test_repeated_nans_without_checkpoint_stop_with_a_report(tmp_path, monkeypatch):
    poison_batches(monkeypatch, {2, 3, 4})
    cfg = config(**{"train.max_consecutive_bad_steps": "3"})
    with pytest.raises(
        train_lib.TrainingDiverged, match="3 consecutive bad steps .* no checkpoint"
    ):
        train_lib.train(cfg, tmp_path, log=lambda s: None)


@pytest.mark.parametrize("skip", [True, False])
def test_a_loss_spike_is_a_bad_step_with_skip_loss_spikes(skip):
    """The guard's loss spike is the counters' one: loss > telemetry.loss_spike_factor x the
    median of the recent losses. With train.skip_loss_spikes it is counted and not applied;
    without, counted and applied."""
    cfg = config(**{
        "train.skip_loss_spikes": str(skip).lower(), "telemetry.spike_window": "8",
        "telemetry.spike_min_history": "4", "optim.warmup_steps": "0",
    })  # fmt: skip
    state = step_lib.create_state(cfg)
    # Eight recent losses of 1.0: a loss of ln(64) = 4.2 at initialization is a spike.
    state = state.replace(loss_history=state.loss_history.at[:].set(1.0), history_count=8)
    batch = np.random.default_rng(0).integers(0, 64, (8, 1, 17)).astype(np.int32)
    new, m = jax.jit(step_lib.train_step)(state, batch)
    assert float(m["train/loss"]) > 1.2 and int(m["spikes/loss"]) == 1
    assert int(m["guard/skipped_steps"]) == int(skip)
    unchanged = [
        np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params), strict=True)
    ]
    assert all(unchanged) if skip else not any(unchanged)


def test_a_checkpoint_with_the_old_guard_state_still_resumes_exactly(tmp_path, straight):
    """Checkpoints written before the guard used the spike counters hold two more scalars
    (loss_avg, accepted_steps); a resume drops them and continues bit-exactly."""
    import orbax.checkpoint as ocp

    from perijax.checkpoint import Checkpointer

    cfg = config()
    train_lib.train(cfg, tmp_path / "new", log=stop_at(4))
    reader = Checkpointer(tmp_path / "new" / "checkpoints", cfg.checkpoint, read_only=True)
    saved = reader.manager.restore(5, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore(),
        data=ocp.args.JsonRestore(),
    ))  # fmt: skip
    reader.manager.close()
    old = {**saved["state"], "loss_avg": np.float32(4.0), "accepted_steps": np.int32(5)}
    writer = Checkpointer(tmp_path / "old" / "checkpoints", cfg.checkpoint)
    writer.save(5, old, saved["data"], {k: v for k, v in saved["meta"].items() if k != "step"})
    writer.close()
    for name in ("config.json", "metrics.jsonl"):
        (tmp_path / "old" / name).write_bytes((tmp_path / "new" / name).read_bytes())
    result = train_lib.train(cfg, tmp_path / "old", log=lambda s: None)
    assert losses_by_step(tmp_path / "old") == straight[0]
    for a, b in zip(params_of(result), straight[1], strict=True):
        np.testing.assert_array_equal(a, b)


def test_restoring_a_different_placement_names_the_parameter(tmp_path):
    train_lib.train(config(**{"model.ln_placement": "peri"}), tmp_path, log=stop_at(2))
    with pytest.raises(
        ConfigError, match=r"the checkpoint has 'params\.blocks\.0\.attn_input_norm\.scale'"
    ):
        train_lib.train(config(**{"model.ln_placement": "post"}), tmp_path, log=lambda s: None)


def test_explicit_restore_starts_a_new_workdir_from_a_checkpoint(tmp_path, straight):
    train_lib.train(config(), tmp_path / "a", log=stop_at(3))  # stops at step 4
    cfg = config(**{"checkpoint.restore": str(tmp_path / "a" / "checkpoints" / "4")})
    train_lib.train(cfg, tmp_path / "b", log=lambda s: None)
    got = losses_by_step(tmp_path / "b")
    assert sorted(got) == [5, 6, 7, 8]
    assert got == {s: straight[0][s] for s in range(5, 9)}


def test_unwritable_workdir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to workdir"):
        train_lib.train(config(), blocker / "run", log=lambda s: None)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_refused_relaunch_leaves_every_file_of_the_workdir_byte_identical(tmp_path, capsys):
    workdir = tmp_path / "run"
    train_lib.train(config(**{"model.ln_placement": "peri"}), workdir, log=stop_at(2))
    before = _snapshot(workdir)
    assert {"config.json", "metrics.jsonl"} <= set(before)
    argv = ["train", "--config", str(ROOT / "configs" / "tiny.py"), "--workdir", str(workdir)]
    argv += [f"--config.{k}={v}" for k, v in {**BASE, "model.ln_placement": "post"}.items()]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not match the config" in err[0], err
    assert _snapshot(workdir) == before
    # A refused --restore into a new workdir creates nothing there either.
    restore = ["--restore", str(workdir / "checkpoints" / "3"), "--workdir", str(tmp_path / "new")]
    assert cli.main(argv[:3] + argv[5:] + restore) == 2
    assert not (tmp_path / "new").exists()


def test_resume_with_changed_settings_keeps_the_first_config_and_a_history(tmp_path):
    from perijax.experiments import runlog

    train_lib.train(config(), tmp_path, log=stop_at(2))  # stops at step 3
    first = (tmp_path / "config.json").read_bytes()
    changed = {"optim.lr": "0.001", "train.log_every_steps": "2"}
    train_lib.train(config(**changed), tmp_path, log=lambda s: None)
    train_lib.train(config(**changed, **{"train.total_steps": "10"}), tmp_path, log=lambda s: None)
    assert (tmp_path / "config.json").read_bytes() == first  # the first launch's, untouched
    history = [json.loads(x) for x in (tmp_path / "config_history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [3, 8]
    assert history[0]["changed"] == {
        "optim.lr": [json.loads(first)["optim"]["lr"], 0.001],
        "train.log_every_steps": [1, 2],
    }
    assert history[1]["changed"] == {"train.total_steps": [8, 10]}
    assert history[1]["config"]["optim"]["lr"] == 0.001
    run = runlog.load_run(tmp_path)  # report (and sweep) read the run as before
    assert run.config["model.ln_placement"] == "peri"
    assert max(r["step"] for r in run.rows) == 10
