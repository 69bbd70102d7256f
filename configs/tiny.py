"""The embedded default: a ~1M-parameter Peri-LN model on the Python standard library's source,
tokenized with a 4,096-token BPE trained locally. Trains on 2 CPU cores in a few minutes.

    perijax train                                   # this config
    perijax train --config configs/tiny.py --config.model.ln_placement=pre
"""

from perijax.config import base_config


def get_config():
    config = base_config()
    config.model.vocab_size = 4096
    config.model.num_layers = 4
    config.model.d_model = 128
    config.model.num_heads = 4
    config.model.d_ff = 384
    config.model.ln_placement = "peri"
    config.model.tie_embeddings = True

    config.data.source = "stdlib"
    config.data.seq_len = 128

    config.optim.lr = 3e-3
    config.optim.warmup_steps = 50

    config.train.total_steps = 500
    config.train.global_batch_size = 32
    config.train.log_every_steps = 20
    config.train.eval_every_steps = 100
    return config
