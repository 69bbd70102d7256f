"""Hugging Face Transformers interoperability: `perijax export` writes a checkpoint as a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads with no custom code; `perijax import`
turns such a folder back into a perijax checkpoint that `perijax train --restore` continues
(their command line: perijax.cli.hf).

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

from perijax.hf.export import export
from perijax.hf.files import cl100k_tokenizer_json, hf_config, write_tokenizer_files
from perijax.hf.importing import HF_DEFAULTS, import_hf, model_config_from_hf
from perijax.hf.targets import TARGETS, Target, resolve_target
from perijax.hf.tensors import (
    from_hf_tensors,
    read_hf_weights,
    read_safetensors,
    to_hf_tensors,
    write_safetensors,
)

__all__ = [
    "HF_DEFAULTS",
    "TARGETS",
    "Target",
    "cl100k_tokenizer_json",
    "export",
    "from_hf_tensors",
    "hf_config",
    "import_hf",
    "model_config_from_hf",
    "read_hf_weights",
    "read_safetensors",
    "resolve_target",
    "to_hf_tensors",
    "write_safetensors",
    "write_tokenizer_files",
]
