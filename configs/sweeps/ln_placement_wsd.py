"""What a warmup-stable-decay branch does to the gap between placements: one 300-step wsd run
per placement (stable at 3e-3, the edge sweep's best rate for Pre-LN and Peri-LN, then a 1-sqrt
decay over the last 60 steps), and from each, decays branched at steps 120 and 180 that end at
150 and 225. Evaluating every 75 steps puts the stable runs' eval loss at 150 and 225 beside
the branches' final one. Seeds 0-2 of each (27 runs, about 20 minutes on 2 CPU cores): one
seed's differences are within the seed noise at this budget. Model, data and budget are
`ln_placement_small.py`'s, in bfloat16.

    perijax sweep --sweep configs/sweeps/ln_placement_wsd.py --root runs/ln-wsd
    perijax report runs/ln-wsd
"""

from pathlib import Path

from perijax.experiments.grid import read_sweep_file

_STABLE = "ln_placement={p},seed={s},total_steps=300,decay_steps=60,branch_from="
_SEEDS = (0, 1, 2)


def get_sweep():
    small = read_sweep_file(Path(__file__).with_name("ln_placement_small.py"))
    overrides = {
        **small["overrides"],
        "model.dtype": "bfloat16",
        "optim.lr": 3e-3,
        "optim.schedule": "wsd",
        "optim.decay_shape": "1-sqrt",
        "train.eval_every_steps": 75,
        "checkpoint.every_steps": 60,  # saves steps 120 and 180, where the branches start
        "checkpoint.keep": 0,
    }
    del overrides["train.total_steps"]
    stable = [
        {
            "model.ln_placement": [p],
            "train.seed": [s],
            "train.total_steps": [300],
            "optim.decay_steps": [60],
            "checkpoint.branch_from": [""],
        }
        for p in ("pre", "post", "peri")
        for s in _SEEDS
    ]
    branches = [
        {
            "model.ln_placement": [p],
            "train.seed": [s],
            "train.total_steps": [total],
            "optim.decay_steps": [total - start],
            "checkpoint.branch_from": ["{root}/" + _STABLE.format(p=p, s=s) + f"@{start}"],
        }
        for p in ("pre", "post", "peri")
        for s in _SEEDS
        for start, total in ((120, 150), (180, 225))
    ]
    return {
        "name": "ln_placement_wsd",
        "base": small["base"],
        "overrides": overrides,
        "grid": stable + branches,
    }
