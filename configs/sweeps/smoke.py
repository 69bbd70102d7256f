"""A seconds-long sweep for tests and docs: 2 placements x 2 learning rates x 1 seed of a 2-layer
model on synthetic tokens, 6 steps each.

    perijax sweep --sweep configs/sweeps/smoke.py --root runs/smoke && perijax report runs/smoke
"""


def get_sweep():
    return {
        "name": "smoke",
        "base": "configs/tiny.py",
        "overrides": {
            "data.source": "synthetic",
            "data.seq_len": 16,
            "model.vocab_size": 64,
            "model.num_layers": 2,
            "model.d_model": 32,
            "model.num_heads": 4,
            "model.d_ff": 64,
            "model.dtype": "float32",
            "train.global_batch_size": 8,
            "train.total_steps": 6,
            "train.log_every_steps": 1,
            "train.eval_every_steps": 3,
            "train.eval_batches": 1,
            "optim.warmup_steps": 1,
        },
        "grid": {
            "model.ln_placement": ["pre", "peri"],
            "optim.lr": [1e-3, 1e-2],
            "train.seed": [0],
        },
    }
