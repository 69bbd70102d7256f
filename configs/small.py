"""A ~24M-parameter Pre-LN model for CPU experiments on the embedded corpus (8,192-token BPE).

perijax train --config configs/small.py --config.model.ln_placement=peri
"""

from perijax.config import base_config


def get_config():
    config = base_config()
    config.model.vocab_size = 8192
    config.model.num_layers = 12
    config.model.d_model = 384
    config.model.num_heads = 6
    config.model.d_ff = 1024
    config.model.tie_embeddings = True
    # bfloat16 compute with float32 parameters and accumulation on every backend: on this
    # 2-core CPU it runs the step about 1.6x faster than float32 (docs/performance.md).
    config.model.dtype = "bfloat16"

    config.data.seq_len = 256

    config.optim.lr = 2e-3
    config.optim.warmup_steps = 200

    config.train.total_steps = 3000
    config.train.global_batch_size = 32
    config.train.log_every_steps = 25
    config.train.eval_every_steps = 250
    return config
