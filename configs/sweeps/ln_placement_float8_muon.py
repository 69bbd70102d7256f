"""Pre-LN, Post-LN and Peri-LN under float8 matmuls and under Muon, against the same runs with
AdamW and bfloat16 matmuls: where each trains best and where it breaks. Model, data and budget
are `ln_placement_small.py`'s (12 layers, d_model 128, 2.6M parameters, 300 steps of 8 x 32
tokens), computed in bfloat16 (`model.dtype`), so "compute" matmuls are bfloat16 ones.

    perijax sweep --sweep configs/sweeps/ln_placement_float8_muon.py --root runs/ln-f8-muon
    perijax report runs/ln-f8-muon

- AdamW, matmuls in bfloat16 (the baseline) and in float8 (`model.matmul_dtype=float8`: e4m3
  forward, e5m2 gradients, per-tensor current scaling) x 8 peak learning rates from 3e-4 to 1:
  the edge sweep (`ln_placement_edge.py`) put every placement's optimum at 1e-3 to 3e-3 and its
  edge at 0.03 to 1, so both are bracketed.
- Muon for the hidden matrices (`optim.name=muon`, AdamW for the rest, one learning rate: the
  Muon updates are scaled to AdamW's RMS) x the same 8 rates.
- refine: seeds 1 and 2 at each placement's and variant's best rate (eval loss).
"""

from pathlib import Path

from perijax.experiments.grid import read_sweep_file

_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
_PLACEMENTS = ["pre", "post", "peri"]


def get_sweep():
    small = read_sweep_file(Path(__file__).with_name("ln_placement_small.py"))
    return {
        "name": "ln_placement_float8_muon",
        "base": small["base"],
        "overrides": {**small["overrides"], "model.dtype": "bfloat16"},
        "grid": [
            {
                "optim.name": ["adamw"],
                "model.matmul_dtype": ["compute", "float8"],
                "model.ln_placement": _PLACEMENTS,
                "optim.lr": _LRS,
                "train.seed": [0],
            },
            {
                "optim.name": ["muon"],
                "model.matmul_dtype": ["compute"],
                "model.ln_placement": _PLACEMENTS,
                "optim.lr": _LRS,
                "train.seed": [0],
            },
        ],
        "refine": {"best": "optim.lr", "grid": {"train.seed": [1, 2]}},
    }
