"""safetensors I/O and the exact parameter conversion between perijax and Transformers layouts
(`to_hf_tensors`, `from_hf_tensors`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from perijax.config import ConfigError, ModelConfig
from perijax.hf.targets import Target
from perijax.packages import require


# ---------------------------------------------------------------------------- safetensors I/O
def np_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # installed with JAX

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def safetensors_numpy():
    """The `safetensors` package's NumPy API (no torch), from the `hf` extra."""
    return require("safetensors.numpy", feature="perijax export/import", extra="hf",
                   package="safetensors")  # fmt: skip


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray]) -> None:
    """Writes `tensors` (float32 / bfloat16 / float16 arrays) as one .safetensors file."""
    st = safetensors_numpy()
    arrays = {name: np.ascontiguousarray(a) for name, a in tensors.items()}
    st.save_file(arrays, str(path), metadata={"format": "pt"})  # transformers requires "pt"


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """{name: array} of one .safetensors file."""
    st = safetensors_numpy()
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
def flat_params(model_or_params: Any) -> dict[str, np.ndarray]:
    """{'blocks.0.attn.wq': float32 array, ...} from a Transformer, an nnx.State, or a flat dict
    (e.g. perijax.trained.params_numpy(model)); a `params.` prefix is dropped."""
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


def unstacked(flat: dict[str, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
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


def stacked(flat: dict[str, np.ndarray], m: ModelConfig) -> dict[str, np.ndarray]:
    """The inverse of `unstacked`."""
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
    cast = np_dtype(dtype)
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
