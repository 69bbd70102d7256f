"""The paper's placement comparison at CPU scale: pre, post, peri and output x 4 peak learning
rates x 3 seeds (48 runs) of a deep-narrow model (12 layers, d_model 128, 2.6M parameters) on the
embedded corpus with a 512-token BPE, 300 steps of 8 x 32 tokens each. About an hour on 2 CPU
cores (docs/experiments.md has the measured times).

    perijax sweep --sweep configs/sweeps/ln_placement_small.py --root runs/ln-small
    perijax report runs/ln-small

The learning rates span 3e-3 (a usual rate for this size) to 1e-1, where trial runs of Pre-LN
pushed the residual stream past the float16 maximum (max |h| above 65,504 by step 30, up to
6.9e5) while Peri-LN stayed below 650 (docs/experiments.md). At this budget the runs measure early
training stability (variance growth, max |h|, gradient spikes, divergence), not final quality.
"""


def get_sweep():
    return {
        "name": "ln_placement_small",
        "base": "configs/tiny.py",
        "overrides": {
            "model.vocab_size": 512,  # small BPE: the head costs little, loss falls quickly
            "model.num_layers": 12,
            "model.d_model": 128,
            "model.num_heads": 4,
            "model.d_ff": 384,
            "data.source": "stdlib",
            "data.seq_len": 32,
            "train.global_batch_size": 8,
            "train.total_steps": 300,
            "train.log_every_steps": 10,
            "train.eval_every_steps": 100,
            "train.eval_batches": 8,
            "optim.warmup_steps": 30,
            "checkpoint.every_steps": 100,  # an interrupted sweep loses at most 100 steps
            "checkpoint.keep": 1,  # 48 runs x ~31 MB (params + Adam moments) each
        },
        "grid": {
            "model.ln_placement": ["pre", "post", "peri", "output"],
            "optim.lr": [3e-3, 1e-2, 3e-2, 1e-1],
            "train.seed": [0, 1, 2],
        },
    }
