"""Goodput (perijax/goodput.py): the wall time of a launch split into compile, restore, data,
eval, checkpoints and steps, with the steps lost to rollbacks and to a restart taken out of the
productive time."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from perijax.goodput import Goodput

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = [
    "--config.data.source=synthetic", "--config.data.seq_len=16", "--config.model.vocab_size=64",
    "--config.model.num_layers=2", "--config.model.d_model=32", "--config.model.num_heads=4",
    "--config.model.d_ff=64", "--config.train.global_batch_size=8",
    "--config.train.log_every_steps=1", "--config.train.eval_every_steps=0",
    "--config.checkpoint.every_steps=10", "--config.checkpoint.async_save=false",
]  # fmt: skip


def test_lost_steps_come_out_of_the_productive_time():
    g = Goodput()
    g.step_done(3.0, first=True)  # compile
    for _ in range(5):
        g.step_done(2.0, first=False)  # 10 s of steps, 2 s each
    g.rolled_back_steps, g.redone_steps = 1, 2
    m = g.metrics()
    assert m["goodput/compile_s"] == 3.0
    assert (m["goodput/rolled_back_s"], m["goodput/redone_s"]) == (2.0, 4.0)
    assert m["goodput/productive_s"] == 4.0
    assert m["goodput/fraction"] == pytest.approx(4.0 / m["goodput/total_s"])
    assert "rolled back 1 steps (2.0 s), redone 2 steps (4.0 s)" in g.summary()


@pytest.mark.slow
def test_a_run_killed_past_its_checkpoint_counts_the_redone_steps(tmp_path):
    args = [sys.executable, "-m", "perijax.cli", "train", "--config", "configs/tiny.py",
            "--workdir", str(tmp_path), *SYNTHETIC]  # fmt: skip
    proc = subprocess.Popen([*args, "--config.train.total_steps=400"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=ROOT)  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 15:
                break  # past checkpoint 10, before 20
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    logged = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if x.strip()]  # fmt: skip
    saved = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    redone = max(logged) - saved
    assert saved == 10 and redone >= 5, (saved, max(logged))
    again = subprocess.run([*args, f"--config.train.total_steps={max(logged) + 5}"],
                           capture_output=True, text=True, cwd=ROOT, timeout=600)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    summary = again.stdout.strip().splitlines()[-1]
    assert summary.startswith("goodput: ") and f"redone {redone} steps" in summary, summary
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["goodput/redone_steps"] == redone and last["goodput/redone_s"] > 0
    assert last["goodput/productive_s"] < last["goodput/total_s"]
