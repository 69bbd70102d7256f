"""Export targets: which Transformers class represents each placement exactly, its norm names
and config defaults (`Target`, `TARGETS`, `resolve_target`)."""

from __future__ import annotations

import dataclasses

from perijax.config import ConfigError, ModelConfig

EXPORT_DTYPES = ("float32", "bfloat16")
DEFAULT_MAX_POSITIONS = 2048  # written when only a ModelConfig (no data.seq_len) is known

# Tokenizer files copied by `import` when the Hugging Face folder has them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


# ------------------------------------------------------------------------------------ targets
@dataclasses.dataclass(frozen=True)
class Target:
    """A Transformers class that computes exactly what one perijax setting computes.

    Attributes:
      name: the `--target` value.
      architecture: the class `from_pretrained` instantiates.
      model_type: config.json's `model_type`.
      placement, qk_norm: the perijax settings it represents.
      norms: perijax block norm -> the Transformers layer norm holding the same weight.
      gemma: norm weights mean (1 + w) and the embeddings are scaled by sqrt(d_model).
      interleaved_rope: RoPE pairs dims (2i, 2i+1) (GLM-4) instead of (i, i + Dh/2).
      fused_gate_up: the MLP stores concat([gate, up]) as one `gate_up_proj` (GLM-4).
      heads_divide_d_model: the config class requires hidden_size % num_attention_heads == 0.
    """

    name: str
    architecture: str
    model_type: str
    placement: str
    qk_norm: str
    norms: dict[str, str]
    gemma: bool = False
    interleaved_rope: bool = False
    fused_gate_up: bool = False
    heads_divide_d_model: bool = False


_PRE_NORMS = {"attn_input_norm": "input_layernorm", "mlp_input_norm": "post_attention_layernorm"}
# Gemma's names: post_attention_layernorm is the attention OUTPUT norm here, unlike Llama's.
_GEMMA_NORMS = {
    "attn_input_norm": "input_layernorm",
    "attn_output_norm": "post_attention_layernorm",
    "mlp_input_norm": "pre_feedforward_layernorm",
    "mlp_output_norm": "post_feedforward_layernorm",
}

TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("llama", "LlamaForCausalLM", "llama", "pre", "none", _PRE_NORMS,
               heads_divide_d_model=True),
        Target("qwen3", "Qwen3ForCausalLM", "qwen3", "pre", "per_head", _PRE_NORMS),
        Target(
            "glm4", "Glm4ForCausalLM", "glm4", "peri", "none",
            {
                "attn_input_norm": "input_layernorm",
                "attn_output_norm": "post_self_attn_layernorm",
                "mlp_input_norm": "post_attention_layernorm",  # GLM-4: the MLP INPUT norm
                "mlp_output_norm": "post_mlp_layernorm",
            },
            interleaved_rope=True, fused_gate_up=True,
        ),
        Target("gemma2", "Gemma2ForCausalLM", "gemma2", "peri", "none", _GEMMA_NORMS,
               gemma=True, heads_divide_d_model=True),
        Target("gemma3", "Gemma3ForCausalLM", "gemma3_text", "peri", "per_head", _GEMMA_NORMS,
               gemma=True, heads_divide_d_model=True),
        Target(
            "olmo2", "Olmo2ForCausalLM", "olmo2", "output", "full",
            {"attn_output_norm": "post_attention_layernorm",
             "mlp_output_norm": "post_feedforward_layernorm"},
        ),
    )
}  # fmt: skip

# The default class for each (placement, qk_norm) that some class represents.
AUTO_TARGETS = {
    ("pre", "none"): "llama",
    ("pre", "per_head"): "qwen3",
    ("peri", "none"): "glm4",
    ("peri", "per_head"): "gemma3",
    ("output", "full"): "olmo2",
}


def resolve_target(m: ModelConfig, target: str = "auto") -> Target:
    """The Transformers class that represents `m` exactly.

    Raises:
      ConfigError: (one line, naming the setting) no class represents `m` exactly, or `target`
        names a class that does not represent it.
    """
    if target != "auto" and target not in TARGETS:
        raise ConfigError(
            f"unknown export target {target!r}: expected auto or one of {', '.join(TARGETS)}"
        )
    if m.ln_placement == "post":
        raise ConfigError(
            "model.ln_placement=post cannot be exported: no Transformers class normalizes the "
            "residual stream after the add (Post-LN); exportable placements: pre, peri, output"
        )
    if m.embed_norm:
        raise ConfigError(
            "model.embed_norm=True cannot be exported: no supported Transformers class "
            "normalizes the token embeddings"
        )
    if m.norm_type != "rmsnorm":
        raise ConfigError(
            f"model.norm_type={m.norm_type} cannot be exported: the supported Transformers "
            "classes use RMSNorm"
        )
    if m.ln_placement == "output" and m.qk_norm != "full":
        raise ConfigError(
            f"model.ln_placement=output with model.qk_norm={m.qk_norm} cannot be exported: "
            "Olmo2ForCausalLM always applies its QK-norm over all heads (model.qk_norm=full), "
            "and no other class has output-only norms"
        )
    name = AUTO_TARGETS.get((m.ln_placement, m.qk_norm))
    if name is None:
        raise ConfigError(
            f"model.qk_norm={m.qk_norm} with model.ln_placement={m.ln_placement} cannot be "
            "exported: no Transformers class has that QK-norm with that placement"
        )
    if target != "auto":
        t = TARGETS[target]
        if (t.placement, t.qk_norm) != (m.ln_placement, m.qk_norm):
            raise ConfigError(
                f"--target {target} ({t.architecture}) represents model.ln_placement="
                f"{t.placement} with model.qk_norm={t.qk_norm}, not ln_placement="
                f"{m.ln_placement} with qk_norm={m.qk_norm}"
            )
        name = target
    t = TARGETS[name]
    if t.heads_divide_d_model and m.d_model % m.num_heads:
        raise ConfigError(
            f"model.d_model={m.d_model} is not a multiple of model.num_heads={m.num_heads}: "
            f"{t.architecture}'s config rejects that (head_dim alone is not enough)"
        )
    return t
