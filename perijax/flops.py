"""Model FLOPs: the one formula every MFU number in perijax uses.

Per trained token (forward + backward = 3 x forward, each multiply-add = 2 FLOPs):

    flops_per_token = 6 * N_matmul + 6 * L * H * Dh * T

- N_matmul: parameters used in matrix multiplies: q/k/v/o projections, the three SwiGLU
  matrices and the LM head (the tied embedding counts once, as the head). The input embedding is
  a gather and the norms are elementwise: neither is a matmul.
- 6 * L * H * Dh * T: attention scores (Q K^T) and the weighted sum (P V), 2 matmuls of
  2 * T * H * Dh FLOPs per token and layer, x3 for the backward pass, halved because a causal
  token attends to T/2 keys on average (PaLM's 12 * L * H * Dh * T counts the full square).
- norms (`norm_flops_per_token`) are reported separately and not counted in MFU: about 5 FLOPs
  per element for RMSNorm, forward only, x3 with backward.
"""

from __future__ import annotations

from perijax.config import ModelConfig
from perijax.norms import NORM_ROLES


def weight_matrices(cfg: ModelConfig) -> list[tuple[int, int]]:
    """The [k, n] shape of every weight matrix used in a matmul: per layer q, k, v, o, then the
    SwiGLU gate, up and down matrices; then the LM head (the tied embedding counts once)."""
    d, h, kv, dh, f = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_ff
    block = [(d, h * dh), (d, kv * dh), (d, kv * dh), (h * dh, d), (d, f), (d, f), (f, d)]
    return block * cfg.num_layers + [(d, cfg.vocab_size)]


def matmul_params(cfg: ModelConfig) -> int:
    return sum(k * n for k, n in weight_matrices(cfg))


def weight_matmul_shapes(cfg: ModelConfig, rows: int) -> dict[tuple[int, int, int], int]:
    """The matrix products a train step does with the weight matrices, for `rows` tokens: each
    (m, k, n) shape, meaning [m, k] x [k, n], with how many times one step does it. A [k, n]
    weight gives the forward product (rows, k, n), the input gradient (rows, n, k) and the
    weight gradient (k, rows, n). `perijax bench` measures the CPU peak on these shapes too, so
    MFU is never taken against a peak below what the model's own matmuls reach alone."""
    shapes: dict[tuple[int, int, int], int] = {}
    for k, n in weight_matrices(cfg):
        for shape in ((rows, k, n), (rows, n, k), (k, rows, n)):
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward), causal attention."""
    attention = 6 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
    return 6 * matmul_params(cfg) + attention


def norm_flops_per_token(cfg: ModelConfig) -> float:
    """Forward + backward FLOPs of the block norms (not counted in MFU)."""
    norms = 2 * len(NORM_ROLES[cfg.ln_placement]) * cfg.num_layers + (1 if cfg.final_norm else 0)
    return 3 * 5 * cfg.d_model * norms
