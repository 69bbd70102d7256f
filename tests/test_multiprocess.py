"""Two local processes (4 fake CPU devices each, jax.distributed over 127.0.0.1) train together
and match one process with 8 devices; each process loads only its own rows of every batch."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from perijax import cli
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

    cfg = cli._build_config(str(ROOT / "configs" / "tiny.py"), list(OVERRIDES.items()))
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
