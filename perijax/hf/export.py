"""`perijax export`: a checkpoint as a Hugging Face folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from perijax.config import Config, ConfigError, ModelConfig
from perijax.hf.files import check_out, commit_folder, hf_config, staging, write_tokenizer_files
from perijax.hf.targets import DEFAULT_MAX_POSITIONS, EXPORT_DTYPES, Target, resolve_target
from perijax.hf.tensors import (
    flat_params,
    safetensors_numpy,
    to_hf_tensors,
    unstacked,
    write_safetensors,
)


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
        (perijax.trained.params_numpy), any param dtype, scanned or per-layer layout.
      cfg: the run's Config (its data.seq_len becomes max_position_embeddings) or a ModelConfig.
      out_dir: the folder to write; written to a temporary sibling and renamed at the end.
      target: "auto" (Llama / Qwen 3 / GLM-4 / Gemma 3 / OLMo 2 by placement and qk_norm) or a
        name in TARGETS, e.g. "gemma2" for a Peri-LN model without QK-norm.
      tokenizer: a perijax.data.tokenizer.Tokenizer (perijax.trained.run_tokenizer(cfg)): its
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
    safetensors_numpy()  # the `hf` extra, checked before anything else
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
    check_out(out, force)
    if max_positions is None:
        max_positions = full.data.seq_len if full is not None else DEFAULT_MAX_POSITIONS
    flat = unstacked(flat_params(model_or_params), m)
    tensors = to_hf_tensors(flat, m, t, dtype)
    config = hf_config(m, t, max_positions=max_positions, tokenizer=tokenizer, dtype=dtype)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")}

    tmp = staging(out)
    try:
        write_safetensors(tmp / "model.safetensors", tensors)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        write_tokenizer_files(tokenizer, tmp, max_positions, log)
        commit_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return t
