"""The trainer: loss falls on the embedded default, gradient accumulation equals the full batch,
and a run writes the files a user expects."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perijax import cli
from perijax import config as config_lib
from perijax import step as step_lib
from perijax import train as train_lib
from perijax.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def tiny(*overrides: tuple[str, str]):
    return config_lib.load(str(ROOT / "configs" / "tiny.py"), list(overrides))


@pytest.mark.parametrize(
    "setting", [{}, {"model.matmul_dtype": "float8"}, {"optim.name": "muon"}],
    ids=["default", "float8", "muon"],
)  # fmt: skip
def test_tiny_config_loss_falls_on_the_cli(tmp_path, data_cache, setting, capsys):
    """`perijax train --config configs/tiny.py [--config.model.matmul_dtype=float8 |
    --config.optim.name=muon]` on the embedded corpus: 40 steps take the held-out loss down by
    more than a nat from its value at initialization (ln 4096 = 8.3)."""
    workdir = tmp_path / "run"
    overrides = {
        "data.cache_dir": data_cache, "train.total_steps": "40",
        "train.global_batch_size": "16", "train.eval_every_steps": "0",
        "train.eval_batches": "2", "optim.warmup_steps": "10",
    }  # fmt: skip
    argv = ["train", "--config", "configs/tiny.py", "--workdir", str(workdir)]
    argv += [f"--config.{k}={v}" for k, v in {**overrides, **setting}.items()]
    assert cli.main(argv) == 0
    capsys.readouterr()
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    evals = [r["eval/loss"] for r in rows if "eval/loss" in r]
    assert len(evals) == 2  # step 0 and the last step
    assert evals[-1] < evals[0] - 1.0, evals
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < evals[0] - 1.0
    resolved = json.loads((workdir / "config.json").read_text())
    for key, value in setting.items():
        section, name = key.split(".")
        assert resolved[section][name] == value


def synthetic_cfg(**kw):
    overrides = {
        "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
        "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4",
        "model.num_kv_heads": "2", "model.d_ff": "64", "model.dtype": "float32",
        "train.global_batch_size": "8", "optim.warmup_steps": "0",
    }  # fmt: skip
    overrides.update(kw)
    return tiny(*overrides.items())


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_grad_accumulation_equals_full_batch(placement):
    cfg = synthetic_cfg(**{"model.ln_placement": placement})
    batch = np.random.default_rng(0).integers(0, 64, (8, 17)).astype(np.int32)
    state = step_lib.create_state(cfg)
    full_loss, full_grads, _ = jax.jit(step_lib.loss_and_grads)(state, batch.reshape(1, 8, 17))
    acc_loss, acc_grads, _ = jax.jit(step_lib.loss_and_grads)(state, batch.reshape(4, 2, 17))
    np.testing.assert_allclose(acc_loss, full_loss, atol=1e-5)
    for a, b in zip(jax.tree.leaves(acc_grads), jax.tree.leaves(full_grads), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)

    step = jax.jit(step_lib.train_step)
    full_state, _ = step(step_lib.create_state(cfg), jnp.asarray(batch.reshape(8, 1, 17)))
    acc_state, _ = step(step_lib.create_state(cfg), jnp.asarray(batch.reshape(2, 4, 17)))
    for a, b in zip(
        jax.tree.leaves(acc_state.params), jax.tree.leaves(full_state.params), strict=True
    ):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_train_step_changes_params_and_counts_steps():
    cfg = synthetic_cfg()
    state = step_lib.create_state(cfg)
    before = jax.tree.map(np.asarray, state.params)
    batch = np.random.default_rng(1).integers(0, 64, (8, 1, 17)).astype(np.int32)
    new_state, metrics = jax.jit(step_lib.train_step, donate_argnums=0)(state, batch)
    assert int(new_state.step) == 1
    assert float(metrics["train/lr"]) == pytest.approx(cfg.optim.lr)
    changed = [
        not np.allclose(a, b)
        for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(before), strict=True)
    ]
    assert all(changed)


def test_cli_run_writes_expected_files(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["train", "--config", "configs/tiny.py", "--workdir", str(workdir)]
    overrides = {
        "data.source": "synthetic", "model.vocab_size": "64", "data.seq_len": "16",
        "model.num_layers": "1", "train.total_steps": "6", "train.log_every_steps": "2",
        "train.eval_every_steps": "3", "train.eval_batches": "1", "optim.warmup_steps": "2",
    }  # fmt: skip
    argv += [f"--config.{k}={v}" for k, v in overrides.items()]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "step 6/6" in out and "tok/s" in out and "eval  step 6" in out

    resolved = json.loads((workdir / "config.json").read_text())
    assert resolved["train"]["total_steps"] == 6
    assert resolved["model"]["dtype"] == "float32"  # "auto" resolved on CPU

    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    for row in train_rows:
        assert {"step", "train/loss", "train/lr", "train/grad_norm", "perf/tokens_per_sec"} <= set(
            row
        )
    assert [r["step"] for r in rows if "eval/loss" in r] == [0, 3, 6]
    assert list(workdir.glob("events.out.tfevents.*"))


def test_seq_len_longer_than_corpus_is_a_config_error(tmp_path):
    cfg = synthetic_cfg(**{"data.seq_len": "100000", "train.global_batch_size": "64"})
    with pytest.raises(ConfigError, match="too small"):
        train_lib.train(cfg, tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_automatic_accumulation_is_resolved_and_recorded(tmp_path, monkeypatch):
    """`train.grad_accum_steps=0` becomes the fewest micro-batches that keep each device within
    the token budget (lowered here to 64): 8 rows of 16 on one device are 2 micro-batches, and
    config.json records the number."""
    from perijax import sharding

    monkeypatch.setattr(sharding, "AUTO_TOKENS_PER_DEVICE", 64)
    cfg = synthetic_cfg(**{"train.grad_accum_steps": "0", "train.total_steps": "1",
                           "train.eval_batches": "1"})  # fmt: skip
    train_lib.train(cfg, tmp_path / "run", devices=jax.devices()[:1], log=lambda s: None)
    written = json.loads((tmp_path / "run" / "config.json").read_text())
    assert written["train"]["grad_accum_steps"] == 2
