"""`perijax import`: a Hugging Face folder as a perijax checkpoint that `perijax train --restore`
continues."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from perijax.config import Config, ConfigError
from perijax.hf.files import check_out, commit_folder, staging
from perijax.hf.targets import TARGETS, TOKENIZER_FILES, Target
from perijax.hf.tensors import (
    from_hf_tensors,
    np_dtype,
    read_hf_weights,
    safetensors_numpy,
    stacked,
)

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
    from perijax.trained import write_checkpoint

    safetensors_numpy()  # the `hf` extra, checked before anything else
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
    check_out(out, force)
    flat = from_hf_tensors(read_hf_weights(hf_dir), cfg.model, t)
    params = stacked(flat, cfg.model)

    from flax import nnx

    from perijax.checkpoint import unflatten
    from perijax.model import abstract_model

    _, like = nnx.split(abstract_model(cfg.model))
    dtype = np_dtype(cfg.model.param_dtype)
    state = unflatten(like, {k: v.astype(dtype) for k, v in params.items()})
    tmp = staging(out)
    try:
        write_checkpoint(cfg, state, tmp)
        copied = [f for f in TOKENIZER_FILES if (hf_dir / f).is_file()]
        for name in copied:
            shutil.copyfile(hf_dir / name, tmp / name)
        commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"imported {t.architecture} -> {out} (ln_placement={t.placement}, qk_norm={t.qk_norm})")
    if "tokenizer.json" not in copied:
        log("note: no tokenizer.json in the Hugging Face folder: none copied")
    return out / "checkpoints" / "0"
