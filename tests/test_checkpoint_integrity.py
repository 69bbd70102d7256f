"""Verified checkpoints: every save records a checksum per array, every restore checks it; a
latest checkpoint that is unreadable, incomplete or altered is named in one line, set aside
(kept) and the run resumes from the previous one, loss for loss as an uninterrupted run; an
explicit restore, `perijax eval`, `generate` and `export` of a bad checkpoint are one-line
errors."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perijax import checkpoint as checkpoint_lib
from perijax import config as config_lib
from perijax import train as train_lib
from perijax.checkpoint import CheckpointError
from perijax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
    "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
    "model.dtype": "float32", "train.global_batch_size": "8", "train.log_every_steps": "1",
    "train.eval_every_steps": "0", "train.eval_batches": "1", "optim.warmup_steps": "2",
    "checkpoint.every_steps": "4", "checkpoint.async_save": "false",
}  # fmt: skip


def config(**overrides):
    return config_lib.load(str(ROOT / "configs" / "tiny.py"), list({**BASE, **overrides}.items()))


def losses(workdir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


# ---------------------------------------------------------------------------- the checksum
def test_the_checksum_sees_every_element_and_not_the_sharding():
    x = jnp.arange(4096, dtype=jnp.float32).reshape(64, 64) / 7
    flat = {"a": x, "b": x.astype(jnp.bfloat16), "c": jnp.int32(3), "d": x > 100}
    base = checkpoint_lib.digests(flat)
    assert checkpoint_lib.digests(flat) == base  # deterministic
    changed = {**flat, "a": x.at[63, 63].add(1e-3)}
    assert checkpoint_lib.digests(changed)["a"] != base["a"]
    swapped = {**flat, "a": x[::-1]}  # the same values elsewhere
    assert checkpoint_lib.digests(swapped)["a"] != base["a"]
    assert checkpoint_lib.digests({**flat, "b": flat["b"].at[0, 1].set(0)})["b"] != base["b"]
    mesh = jax.make_mesh((4, 2), ("x", "y"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sharded = jax.device_put(
        x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", "y"))
    )
    assert checkpoint_lib.digests({"a": sharded})["a"] == base["a"]


# -------------------------------------------------------------------------- fallback in train
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 16-step run, and a copy of it as a run killed after its checkpoint 12
    (checkpoints 8 and 12 kept)."""
    root = tmp_path_factory.mktemp("integrity")
    train_lib.train(config(**{"train.total_steps": "16"}), root / "straight", log=lambda s: None)
    shutil.copytree(root / "straight", root / "base")
    shutil.rmtree(root / "base" / "checkpoints" / "16")
    return root


def truncate_metadata(step_dir: Path) -> str:
    (step_dir / "state" / "_sharding").write_text('{"trunc')
    return "cannot be read"


def zero_array_bytes(step_dir: Path) -> str:
    """4 KB of zeros every 16 KB of the array data files: compressed chunks then fail to decode
    (or, stored plainly, decode to other values, which the checksums catch)."""
    for f in (step_dir / "state").rglob("d/*"):
        data = bytearray(f.read_bytes())
        for start in range(len(data) // 8, len(data), 16384):
            data[start : start + 4096] = bytes(len(data[start : start + 4096]))
        f.write_bytes(bytes(data))
    return "cannot be read|does not match the checksum"


def delete_a_file(step_dir: Path) -> str:
    biggest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
    biggest.unlink()
    return "cannot be read"


def altered_but_readable(step_dir: Path) -> str:
    """Another checkpoint's arrays under this one's checksums: decodes cleanly, holds other
    values (what a silent bit flip that survives compression would look like)."""
    other = step_dir.parent / "8" / "state"
    shutil.rmtree(step_dir / "state")
    shutil.copytree(other, step_dir / "state")
    return "does not match the checksum saved with it"


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage", [truncate_metadata, zero_array_bytes, delete_a_file, altered_but_readable]
)
def test_a_bad_latest_checkpoint_falls_back_to_the_previous_one(runs, tmp_path, damage):
    workdir = tmp_path / "run"
    shutil.copytree(runs / "base", workdir)
    expected = damage(workdir / "checkpoints" / "12")
    log = []
    train_lib.train(config(**{"train.total_steps": "16"}), workdir, log=log.append)
    notes = [line for line in log if line.startswith("note: checkpoint")]
    assert len(notes) == 2, log[:5]
    assert re.search(f"checkpoints/12 (is corrupt: .*)?({expected})", notes[0]), notes[0]
    assert "\n" not in notes[0]
    assert "trying the previous checkpoint" in notes[0]
    assert "checkpoint 12 moved to" in notes[1]
    assert any(f"resumed from {workdir}/checkpoints/8" in line for line in log)
    # Kept, out of the way: the new run saved its own step 12 and 16.
    assert (workdir / "checkpoints_bad" / "12" / "state").is_dir()
    assert {12, 16} <= {int(p.name) for p in (workdir / "checkpoints").iterdir()}
    straight = losses(runs / "straight")
    resumed = losses(workdir)
    assert {s: resumed[s] for s in range(9, 17)} == {s: straight[s] for s in range(9, 17)}


@pytest.mark.slow
def test_an_explicit_restore_and_the_readers_refuse_a_bad_checkpoint(runs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(runs / "base", workdir)
    altered_but_readable(workdir / "checkpoints" / "12")
    bad = str(workdir / "checkpoints" / "12")
    with pytest.raises(CheckpointError, match=r"checkpoints/12 is corrupt: 'params\.") as e:
        train_lib.train(config(**{"checkpoint.restore": bad, "train.total_steps": "16"}),
                        tmp_path / "other", log=lambda s: None)  # fmt: skip
    assert "\n" not in str(e.value)
    assert not (workdir / "checkpoints_bad").exists()  # an explicit restore moves nothing
    for argv in (["eval", bad, "--max-batches", "1"],
                 ["generate", bad, "--ids", "--prompt", "1 2", "--max-new-tokens", "2"],
                 ["export", bad, "--out", str(tmp_path / "hf")]):  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "perijax.cli", *argv], capture_output=True,
                              text=True, cwd=ROOT, timeout=300)  # fmt: skip
        assert proc.returncode == 2, (argv[0], proc.stderr[-1500:])
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "checkpoints/12 is corrupt" in lines[0], (argv[0], lines)


def test_a_checkpoint_without_checksums_still_restores(tmp_path):
    """Checkpoints written before checksums existed carry none: they restore unverified."""
    cfg = config(**{"train.total_steps": "4"})
    train_lib.train(cfg, tmp_path, log=lambda s: None)
    meta = tmp_path / "checkpoints" / "4" / "meta" / "metadata"
    record = json.loads(meta.read_text())
    assert len(record.pop("digests")) > 10
    meta.write_text(json.dumps(record))
    log = []
    train_lib.train(config(**{"train.total_steps": "5"}), tmp_path, log=log.append)
    assert any("resumed from" in line and line.endswith("/4") for line in log)


def test_config_mismatch_is_not_a_bad_checkpoint(runs, tmp_path):
    """A checkpoint of another model shape is a config error, not a fallback."""
    workdir = tmp_path / "run"
    shutil.copytree(runs / "base", workdir)
    with pytest.raises(ConfigError, match="does not match the config"):
        train_lib.train(config(**{"model.d_model": "64", "train.total_steps": "16"}), workdir,
                        log=lambda s: None)  # fmt: skip
    assert not (workdir / "checkpoints_bad").exists()
    np.testing.assert_equal(sorted(p.name for p in (workdir / "checkpoints").iterdir()),
                            ["12", "8"])  # fmt: skip
