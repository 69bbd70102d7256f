"""The paper's model sizes (Kim et al., arXiv 2502.02732): 400M, 1.5B and 3.2B parameters.

The paper does not publish its shapes; these are Llama-style shapes (SwiGLU, RoPE, untied
embeddings, the 100,277-token cl100k_base vocabulary) whose parameter counts land within 3% of
the names. docs/configs.md lists each shape and its count.

    perijax train --config configs/paper.py:size=400m --config.model.ln_placement=peri
"""

from perijax.config import ConfigError, base_config, parse_config_arg

# size: (num_layers, d_model, num_heads, d_ff)
SHAPES = {
    "400m": (16, 1024, 16, 2688),
    "1.5b": (22, 2048, 16, 5376),
    "3.2b": (34, 2560, 20, 6912),
}
CL100K_VOCAB = 100_277


def get_config(arg=None):
    args = parse_config_arg(arg, size="400m")
    if args.size not in SHAPES:
        raise ConfigError(
            f"configs/paper.py: size={args.size!r} is not valid: expected one of "
            + ", ".join(SHAPES)
        )
    num_layers, d_model, num_heads, d_ff = SHAPES[args.size]

    config = base_config()
    config.model.vocab_size = CL100K_VOCAB
    config.model.num_layers = num_layers
    config.model.d_model = d_model
    config.model.num_heads = num_heads
    config.model.d_ff = d_ff
    # Memory defaults for these sizes: one compiled block for all layers (fast compiles), and
    # each block recomputed in the backward pass (docs/scaling.md has the plans).
    config.model.scan_layers = True
    config.model.remat = "full"

    # Paper setup (docs/paper.md, "Setup"): 30B tokens, AdamW with cosine decay, weight decay 0.1.
    # Sequence length 8192 and the batch are uncertain in the paper's text; override as needed.
    config.data.seq_len = 8192
    config.optim.lr = 2e-3  # Pre-LN's best learning rate in the paper's sweep
    config.optim.warmup_steps = 1000
    config.optim.weight_decay = 0.1
    config.train.global_batch_size = 256
    # Micro-batches for the device count at hand: two sequences of 8,192 per device.
    config.train.grad_accum_steps = 0
    config.train.total_steps = 14_305  # 30e9 tokens / (256 * 8192)
    config.train.log_every_steps = 10
    config.train.eval_every_steps = 1000
    return config
