"""Ahead-of-time planning: nothing allocated, per-device memory that shrinks with FSDP, remat
that trades memory (not results), and the `perijax plan` command."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from perijax import config as config_lib
from perijax.cli.plan import format_report, plan

ROOT = Path(__file__).resolve().parents[1]
SMALL = {
    "model.num_layers": "4", "model.d_model": "256", "model.num_heads": "4", "model.d_ff": "512",
    "model.vocab_size": "1024", "data.seq_len": "64", "train.global_batch_size": "16",
}  # fmt: skip


def report(**overrides):
    cfg = config_lib.load(str(ROOT / "configs" / "small.py"), list({**SMALL, **overrides}.items()))
    return plan(cfg, "h100")


def test_state_memory_shrinks_as_one_over_fsdp():
    reports = {n: report(**{"mesh.data": "-1", "mesh.fsdp": str(n)}) for n in (1, 2, 4, 8)}
    state = {
        n: r["per_device"]["params_bytes"] + r["per_device"]["opt_state_bytes"]
        for n, r in reports.items()
    }
    for n in (2, 4, 8):
        assert state[n] == pytest.approx(state[1] / n, rel=0.02), state
    peaks = [reports[n]["per_device"]["peak_bytes"] for n in (1, 2, 4, 8)]
    assert peaks == sorted(peaks, reverse=True) and peaks[-1] < peaks[0], peaks
    # 3 copies of float32 parameters (params, Adam mu, nu), split 8 ways.
    assert state[8] == pytest.approx(3 * 4 * reports[8]["parameters"] / 8, rel=0.02)


def test_remat_reduces_temporary_memory():
    temps = {
        remat: report(**{"model.remat": remat, "model.scan_layers": "true"})["per_device"][
            "temp_bytes"
        ]
        for remat in ("none", "full")
    }
    assert temps["full"] < temps["none"], temps


def test_model_flops_formula_matches_xla_count():
    r = report(**{"mesh.data": "-1"})
    d = r["per_device"]
    # XLA computes the full T x T attention (masked), the formula only the causal half.
    assert d["xla_flops_per_step"] == pytest.approx(d["model_flops_per_step"], rel=0.1)


def test_plan_command_simulates_the_target_devices(tmp_path):
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "plan", "--config", "configs/paper.py:size=400m",
         "--devices", "16", "--accelerator", "tpu-v5e", "--json", str(out),
         "--config.mesh.data=-1", "--config.mesh.fsdp=4", "--config.model.scan_layers=true",
         "--config.model.remat=full", "--config.data.seq_len=512",
         "--config.train.global_batch_size=32"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["devices"] == 16 and r["mesh"] == {"data": 4, "fsdp": 4, "tensor": 1}
    assert "per device" in proc.stdout and ("fits" in proc.stdout or "NOT FIT" in proc.stdout)
    assert r["per_device"]["params_bytes"] == pytest.approx(4 * r["parameters"] / 4, rel=0.02)


def test_plan_picks_the_accelerators_loss_chunk():
    """`model.loss_chunk_len=0` is resolved by the target's rule (perijax.loss), per device:
    planned on CPU devices, the CPU's own rule would cut the loss much finer."""
    from perijax.loss import auto_chunk_len

    # 8 devices, 2 rows of 512 tokens each; the whole sequence is 64M logits per device.
    r = report(**{"model.vocab_size": "65536", "data.seq_len": "512", "mesh.data": "-1"})
    assert r["config"]["model"]["loss_chunk_len"] == 512
    assert auto_chunk_len(2, 512, 65536, backend="gpu") == 512
    assert auto_chunk_len(2, 512, 65536, backend="cpu") == 128
    assert auto_chunk_len(16, 512, 65536, backend="gpu") == 256  # the global batch's


def test_plan_compiles_what_the_target_runs():
    """For a GPU target `model.attention=auto` is cuDNN, which does not compile on CPU: the plan
    names it and compiles blockwise attention in its place (memory linear in T, as the fused
    kernels'), far below the XLA path's materialized scores at a long sequence."""
    long = {"data.seq_len": "2048", "mesh.data": "-1", "model.remat": "full",
            "model.scan_layers": "true"}  # fmt: skip
    fused = report(**long)
    xla = report(**long, **{"model.attention": "xla"})
    assert fused["attention"] == {"target": "cudnn", "planned": "blockwise"}
    assert xla["attention"] == {"target": "xla", "planned": "xla"}
    assert fused["config"]["model"]["attention"] == "blockwise"
    t_fused, t_xla = fused["per_device"]["temp_bytes"], xla["per_device"]["temp_bytes"]
    assert t_fused < 0.5 * t_xla, (t_fused, t_xla)
    assert "cudnn on the target, planned as blockwise" in format_report(fused)


def test_automatic_accumulation_splits_the_batch_for_the_devices():
    from perijax.config import ConfigError
    from perijax.sharding import grad_accum_for

    # The paper's 256 x 8,192: two sequences per device, whatever the device count.
    assert grad_accum_for(256, 0, 8192, (1, 1, 1)) == 128
    assert grad_accum_for(256, 0, 8192, (1, 8, 1)) == 16
    assert grad_accum_for(256, 0, 8192, (4, 8, 2)) == 4  # tensor does not split the batch
    assert grad_accum_for(256, 0, 512, (1, 8, 1)) == 1  # short sequences: one micro-batch
    assert grad_accum_for(48, 0, 32768, (1, 8, 1)) == 6  # one sequence per device at least
    assert grad_accum_for(256, 4, 8192, (1, 8, 1)) == 4  # an explicit setting is kept
    with pytest.raises(ConfigError, match="cannot be split into micro-batches divisible by "
                       "mesh.data x mesh.fsdp = 8: use a multiple of 8"):  # fmt: skip
        grad_accum_for(12, 0, 128, (2, 4, 1))


@pytest.mark.slow
def test_paper_400m_plans_under_25_gib_on_one_h100(tmp_path):
    """The paper config's automatic accumulation and the fused kernel's blockwise stand-in: the
    400M model at 8,192 tokens on one H100 plans well inside its 80 GiB."""
    out = tmp_path / "plan.json"
    proc = subprocess.run(
        [sys.executable, "-m", "perijax.cli", "plan", "--config", "configs/paper.py:size=400m",
         "--devices", "1", "--accelerator", "h100", "--json", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    r = json.loads(out.read_text())
    assert r["config"]["train"]["grad_accum_steps"] == 128
    assert r["attention"] == {"target": "cudnn", "planned": "blockwise"}
    assert r["per_device"]["peak_bytes"] < 25 * 2**30, r["per_device"]
    assert "attention: cudnn on the target, planned as blockwise" in proc.stdout
