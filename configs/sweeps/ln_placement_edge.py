"""The placement comparison pushed to its edges: where each placement trains best and where it
breaks, in float32 and float16, with seeds at each placement's best learning rate. The model,
data and budget are those of `ln_placement_small.py` (12 layers, d_model 128, 2.6M parameters,
300 steps of 8 x 32 tokens); output-only is left out to keep the CPU cost near an hour.

    perijax sweep --sweep configs/sweeps/ln_placement_edge.py --root runs/ln-edge
    perijax report runs/ln-edge

- float32: pre, post, peri x 10 peak learning rates from 3e-5 to 1 (half-decade steps), seed 0.
  The shipped sweep's lowest rate (3e-3) was the best one for Pre-LN and Peri-LN, so its
  optimum was never bracketed; its highest (0.1) diverged nothing.
- float16 (`model.dtype=float16`, dynamic loss scaling): the same placements from 3e-4 to 1,
  where activations past 65,504 overflow; lower, float16 tracks float32 (a trial at 1e-4 gave
  the same eval loss to 4 digits). 3e-4 brackets the float16 optimum of Pre-LN and Post-LN
  (1e-3).
- refine: once the grid has finished, seeds 1-4 at the learning rate with the lowest final eval
  loss among the stable runs of each placement and dtype, so that rate has 5 seeds
  (docs/experiments.md).
"""

from pathlib import Path

from perijax.experiments.grid import read_sweep_file

_LRS_FLOAT32 = [3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]
_LRS_FLOAT16 = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0]


def get_sweep():
    small = read_sweep_file(Path(__file__).with_name("ln_placement_small.py"))
    return {
        "name": "ln_placement_edge",
        "base": small["base"],
        "overrides": small["overrides"],
        "grid": [
            {
                "model.dtype": ["float32"],
                "model.ln_placement": ["pre", "post", "peri"],
                "optim.lr": _LRS_FLOAT32,
                "train.seed": [0],
            },
            {
                "model.dtype": ["float16"],
                "model.ln_placement": ["pre", "post", "peri"],
                "optim.lr": _LRS_FLOAT16,
                "train.seed": [0],
            },
        ],
        # Then 4 more seeds at each placement's and dtype's best learning rate (eval loss).
        "refine": {"best": "optim.lr", "grid": {"train.seed": [1, 2, 3, 4]}},
    }
