"""Hugging Face interoperability (perijax/hf/): every export target computes perijax's logits and
greedy continuations in transformers; import and export invert each other, on perijax-made and on
transformers-made weights; settings no class represents are refused; the tokenizer files load
with AutoTokenizer; and `perijax export` / `perijax import` work on a trained checkpoint."""

import argparse
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perijax import cli, hf
from perijax import config as config_lib
from perijax import train as train_lib
from perijax.checkpoint import unflatten
from perijax.cli import hf as hf_cli
from perijax.config import ConfigError, ModelConfig
from perijax.generate import generate
from perijax.model import Transformer
from perijax.trained import load_model, params_numpy

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 97
TOKENS = np.random.default_rng(1).integers(0, VOCAB, (2, 12))
PROMPTS = np.random.default_rng(2).integers(0, VOCAB, (2, 5)).tolist()
NEW_TOKENS = 8
# (target, ln_placement, qk_norm) for every class export writes.
CASES = [
    ("llama", "pre", "none"),
    ("qwen3", "pre", "per_head"),
    ("glm4", "peri", "none"),
    ("gemma2", "peri", "none"),
    ("gemma3", "peri", "per_head"),
    ("olmo2", "output", "full"),
]
EXACT = ("llama", "qwen3", "glm4", "olmo2")  # conversions that only move and transpose values


def model_config(placement: str, qk_norm: str = "none", tie: bool = False, **kw) -> ModelConfig:
    """Tiny, with grouped-query attention and head_dim (24) != d_model / num_heads (12); weights
    large enough for logits of std ~2, so a conversion slip shows."""
    return ModelConfig(
        vocab_size=VOCAB, num_layers=2, d_model=48, num_heads=4, num_kv_heads=2, head_dim=24,
        d_ff=96, ln_placement=placement, qk_norm=qk_norm, tie_embeddings=tie, rope_theta=500.0,
        norm_eps=1e-5, init_std=0.25, dtype="float32", **kw,
    )  # fmt: skip


def random_model(m: ModelConfig, seed: int = 0) -> Transformer:
    """A perijax model with random weights and random norm scales (1 + 0.3 * normal)."""
    model = Transformer(m, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)

    def scale(path, x):
        if "scale" not in (str(getattr(p, "key", p)) for p in path):
            return x
        return jnp.asarray(1 + 0.3 * rng.standard_normal(x.shape), x.dtype)

    nnx.update(model, jax.tree_util.tree_map_with_path(scale, nnx.state(model, nnx.Param)))
    scales = [v for k, v in params_numpy(model).items() if k.endswith("scale")]
    assert not m.learnable_norm_scale or all(np.std(s) > 0.1 for s in scales)
    return model


def model_from_flat(m: ModelConfig, flat: dict) -> Transformer:
    graphdef, like = nnx.split(nnx.eval_shape(lambda: Transformer(m, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, unflatten(like, {k: jnp.asarray(v) for k, v in flat.items()}))


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


def hf_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False
        )
    return out[:, ids.shape[1] :].tolist()


def assert_params_equal(a: dict, b: dict, exact: bool) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        if exact:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        else:  # Gemma: (1 + w) and sqrt(d) round once each way in float32
            np.testing.assert_allclose(a[key], b[key], rtol=2.4e-7, atol=6e-8, err_msg=key)


# ---------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("target,placement,qk_norm", CASES, ids=[c[0] for c in CASES])
def test_export_computes_perijax_logits_in_transformers(tmp_path, target, placement, qk_norm, tie):
    m = model_config(placement, qk_norm, tie)
    model = random_model(m)
    t = hf.export(model, m, tmp_path / "hf", target=target, log=lambda s: None)
    assert t.name == target
    theirs = load_hf(tmp_path / "hf")
    assert type(theirs).__name__ == t.architecture

    ours = np.asarray(model(jnp.asarray(TOKENS)))
    assert ours.std() > 1.5  # logits large enough for the comparison to mean something
    diff = float(np.abs(ours - hf_logits(theirs, TOKENS)).max())
    print(f"{t.architecture} {'tied' if tie else 'untied'}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4
    assert hf_greedy(theirs, PROMPTS, NEW_TOKENS) == generate(model, PROMPTS, NEW_TOKENS)


def test_export_of_fixed_norm_scales_and_scanned_layers(tmp_path):
    """learnable_norm_scale=False exports scales of exactly 1 (Gemma: w = 0, the tied final
    norm sqrt(d) - 1); scan_layers parameters are unstacked."""
    m = model_config("peri", tie=True, learnable_norm_scale=False, scan_layers=True)
    model = random_model(m)
    hf.export(model, m, tmp_path / "hf", target="gemma2", log=lambda s: None)
    theirs = load_hf(tmp_path / "hf")
    diff = np.abs(np.asarray(model(jnp.asarray(TOKENS))) - hf_logits(theirs, TOKENS)).max()
    assert diff <= 1e-4
    w = theirs.model.layers[1].pre_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(w, 0.0)
    w = theirs.model.norm.weight.detach().numpy()
    np.testing.assert_allclose(w, np.sqrt(np.float32(48)) - 1, rtol=1e-7)


def test_bfloat16_export_loads_as_bfloat16(tmp_path):
    from transformers import AutoModelForCausalLM

    m = model_config("pre")
    model = random_model(m)
    hf.export(model, m, tmp_path / "hf", dtype="bfloat16", log=lambda s: None)
    tensors = hf.read_hf_weights(tmp_path / "hf")
    assert str(tensors["model.layers.0.self_attn.q_proj.weight"].dtype) == "bfloat16"
    assert tensors["model.norm.weight"].dtype == np.float32  # norms keep float32
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    back = hf.from_hf_tensors(tensors, m, hf.model_config_from_hf(config)[0])
    wq = params_numpy(model)["blocks.0.attn.wq"]
    np.testing.assert_array_equal(
        back["blocks.0.attn.wq"], wq.astype(jnp.bfloat16).astype(np.float32)
    )
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert theirs.dtype == torch.bfloat16
    ours = np.asarray(model(jnp.asarray(TOKENS)))
    relative_rms = np.sqrt(np.mean((ours - hf_logits(theirs, TOKENS)) ** 2)) / ours.std()
    # bfloat16 weights and compute: 2.6% here; perijax's own bfloat16 compute: 2.2%.
    assert relative_rms < 0.05


# ------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("target,placement,qk_norm", CASES, ids=[c[0] for c in CASES])
def test_export_then_import_returns_the_same_model(tmp_path, target, placement, qk_norm, tie):
    m = model_config(placement, qk_norm, tie)
    model = random_model(m, seed=3)
    hf.export(model, m, tmp_path / "hf", target=target, log=lambda s: None)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    t, fields = hf.model_config_from_hf(config)
    assert t.name == target
    assert dataclasses.replace(m, **fields) == m
    tensors = hf.read_hf_weights(tmp_path / "hf")
    assert_params_equal(hf.from_hf_tensors(tensors, m, t), params_numpy(model), target in EXACT)


def transformers_model(target: str, tie: bool, seed: int = 0):
    """A transformers model of class `target` with random weights and norm weights, initialized
    by transformers (its config from `hf.hf_config`); save_pretrained writes its own files."""
    from transformers import CONFIG_MAPPING, AutoModelForCausalLM

    t = hf.TARGETS[target]
    m = model_config(t.placement, t.qk_norm, tie)
    cfg = hf.hf_config(m, t, max_positions=64)
    cfg = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(CONFIG_MAPPING[t.model_type](**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p) + (0.0 if t.gemma else 1.0))
            else:
                p.normal_(0.0, 0.25)
    return model


@pytest.mark.parametrize("target", [c[0] for c in CASES])
def test_import_of_transformers_weights_then_export_round_trips(tmp_path, target):
    tie = target in ("llama", "gemma2", "olmo2")
    theirs = transformers_model(target, tie)
    theirs.save_pretrained(tmp_path / "hf")
    t, fields = hf.model_config_from_hf(json.loads((tmp_path / "hf" / "config.json").read_text()))
    m = ModelConfig(dtype="float32", **fields)
    flat = hf.from_hf_tensors(hf.read_hf_weights(tmp_path / "hf"), m, t)
    ours = model_from_flat(m, flat)
    diff = float(np.abs(np.asarray(ours(jnp.asarray(TOKENS))) - hf_logits(theirs, TOKENS)).max())
    print(f"imported {t.architecture}: max |logit diff| = {diff:.2e}")
    assert diff <= 1e-4

    back = hf.to_hf_tensors(flat, m, t)
    state = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    if tie:
        state.pop("lm_head.weight")
    # Gemma stores w for a scale of (1 + w) and E / sqrt(d): the stored values may differ in the
    # last bits, but what the model computes with, fl32(1 + w) and fl32(E * fl32(sqrt d)), is
    # bit-equal after the round trip; only the tied final norm, which carries the sqrt(d) fold
    # (one multiply and one divide), rounds.
    back, state = effective(back, m, t), effective(state, m, t)
    if t.gemma and tie:
        folded = back.pop("model.norm.weight"), state.pop("model.norm.weight")
        np.testing.assert_allclose(*folded, rtol=1.2e-7)
    assert_params_equal(back, state, exact=True)


def effective(tensors: dict, m: ModelConfig, t: hf.Target) -> dict:
    """The weights a Transformers model of class `t` computes with (float32)."""
    if not t.gemma:
        return tensors
    c = np.float32(np.sqrt(m.d_model))
    out = {k: np.float32(1) + v if k.endswith("norm.weight") else v for k, v in tensors.items()}
    out["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"] * c
    return out


def test_written_safetensors_read_back_with_the_safetensors_library(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    m = model_config("peri")
    hf.export(random_model(m), m, tmp_path / "hf", log=lambda s: None)
    ours = hf.read_safetensors(tmp_path / "hf" / "model.safetensors")
    theirs = st.load_file(tmp_path / "hf" / "model.safetensors")
    assert sorted(ours) == sorted(theirs)
    for key in ours:
        np.testing.assert_array_equal(ours[key], theirs[key])


def test_sharded_folders_are_read(tmp_path):
    tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    hf.write_safetensors(tmp_path / "model-00001-of-00002.safetensors", {"a": tensors["a"]})
    hf.write_safetensors(tmp_path / "model-00002-of-00002.safetensors", {"b": tensors["b"]})
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    read = hf.read_hf_weights(tmp_path)
    assert sorted(read) == ["a", "b"]
    np.testing.assert_array_equal(read["a"], tensors["a"])


def test_hf_defaults_match_the_installed_transformers():
    """import reads a missing config.json key as its class default: the table must agree."""
    from transformers import CONFIG_MAPPING

    for model_type, defaults in hf.HF_DEFAULTS.items():
        cfg = CONFIG_MAPPING[model_type]()
        for key, value in defaults.items():
            if key == "partial_rotary_factor":
                assert cfg.rope_parameters[key] == value, (model_type, key)
            elif value is None and key == "num_key_value_heads":
                assert cfg.num_key_value_heads == cfg.num_attention_heads
            elif value is None and key == "head_dim":
                assert getattr(cfg, "head_dim", None) in (
                    None,
                    cfg.hidden_size // cfg.num_attention_heads,
                )
            else:
                assert getattr(cfg, key) == value, (model_type, key)


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize(
    "change,message",
    [
        ({"ln_placement": "post"}, "model.ln_placement=post cannot be exported"),
        ({"embed_norm": True}, "model.embed_norm=True cannot be exported"),
        ({"ln_placement": "output"}, "model.ln_placement=output with model.qk_norm=none cannot"),
        ({"ln_placement": "output", "qk_norm": "per_head"}, "ln_placement=output with model.qk_"),
        ({"norm_type": "layernorm"}, "model.norm_type=layernorm cannot be exported"),
        ({"qk_norm": "full"}, "model.qk_norm=full with model.ln_placement=pre cannot"),
        ({"d_model": 66, "head_dim": 16}, "model.d_model=66 is not a multiple of model.num_heads"),
    ],
    ids=["post", "embed_norm", "output", "output-per-head", "layernorm", "pre-full", "d%H"],
)
def test_export_refuses_what_no_class_represents(tmp_path, change, message):
    m = dataclasses.replace(model_config("pre"), **change)
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        hf.export({}, m, tmp_path / "hf", log=lambda s: None)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_target_of_another_placement(tmp_path):
    with pytest.raises(ConfigError, match=r"--target gemma2 \(Gemma2ForCausalLM\) represents"):
        hf.export({}, model_config("pre"), tmp_path / "hf", target="gemma2")


def _hf_config(target: str, **changes) -> dict:
    t = hf.TARGETS[target]
    cfg = hf.hf_config(model_config(t.placement, t.qk_norm), t, max_positions=64)
    return {**cfg, **changes}


@pytest.mark.parametrize(
    "config,message",
    [
        (_hf_config("gemma2", hidden_activation="gelu_pytorch_tanh"), "activation gelu_pytorch"),
        (_hf_config("gemma2", final_logit_softcapping=30.0), "final_logit_softcapping=30.0"),
        (_hf_config("gemma2", layer_types=None, sliding_window=32), "sliding-window layers"),
        (_hf_config("gemma2", query_pre_attn_scalar=16), "query_pre_attn_scalar=16"),
        (_hf_config("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope_scaling"),
        (_hf_config("llama", mlp_bias=True), "mlp_bias=true"),
        (_hf_config("glm4", attention_bias=True), "attention_bias=true"),
        (
            _hf_config("glm4", partial_rotary_factor=0.5, rope_parameters=None),
            "partial_rotary_factor=0.5",
        ),
        (_hf_config("qwen3", use_sliding_window=True), "use_sliding_window=true"),
        ({**_hf_config("llama"), "model_type": "mistral"}, "cannot import model_type='mistral'"),
    ],
    ids=["geglu", "softcap", "sliding", "qscale", "rope-scaling", "mlp-bias", "attn-bias",
         "partial-rope", "qwen-window", "mistral"],
)  # fmt: skip
def test_import_refuses_what_perijax_does_not_compute(config, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as e:
        hf.model_config_from_hf(config)
    assert "\n" not in str(e.value)


def test_import_refuses_extra_and_missing_tensors(tmp_path):
    m = model_config("pre")
    t = hf.TARGETS["llama"]
    tensors = hf.to_hf_tensors(params_numpy(random_model(m)), m, t)
    bias = {**tensors, "model.layers.0.self_attn.q_proj.bias": np.zeros(96, np.float32)}
    with pytest.raises(ConfigError, match="q_proj.bias' has no perijax counterpart"):
        hf.from_hf_tensors(bias, m, t)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match="'model.layers.1.mlp.up_proj.weight' is missing"):
        hf.from_hf_tensors(tensors, m, t)


# -------------------------------------------------------------------------------- tokenizers
TEXTS = [
    "def f(x):\n    return x ** 2  # square\n",
    "héllo wörld, 日本語のテキスト 🤖🤖  \n\n\t tabs  and   spaces ",
    "I'm sure they'll say we've 1234567 numbers.\r\n",
    "   leading and trailing   ",
]


def test_tokenizer_json_export_loads_with_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    from perijax.data.tokenizer import JsonTokenizer, train_bpe

    corpus = [
        (ROOT / "perijax" / name).read_text() for name in ("hf/tensors.py", "model.py", "norms.py")
    ]
    train_bpe(corpus, 300).save(str(tmp_path / "tokenizer.json"))
    tok = JsonTokenizer(tmp_path / "tokenizer.json")
    m = dataclasses.replace(model_config("pre"), vocab_size=tok.vocab_size)
    hf.export(random_model(m), m, tmp_path / "hf", tokenizer=tok, log=lambda s: None)
    auto = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*TEXTS, "a literal <|endoftext|> stays text"]:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text).tolist()
    assert auto.eos_token_id == tok.eod_id
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == tok.eod_id


def test_cl100k_base_converts_exactly():
    from tokenizers import Tokenizer

    from perijax.data.tokenizer import CL100K_SPECIAL_TOKENS, load_tokenizer

    try:
        tok = load_tokenizer("cl100k_base")
    except ValueError as e:
        pytest.skip(str(e))
    converted = Tokenizer.from_str(hf.cl100k_tokenizer_json())
    converted.encode_special_tokens = True  # as split_special_tokens=True in tokenizer_config
    docs = [(ROOT / "docs" / name).read_text() for name in ("data.md", "configs.md")]
    for text in [*TEXTS, *docs]:
        assert converted.encode(text, add_special_tokens=False).ids == tok.encode(text).tolist()
    for token, i in CL100K_SPECIAL_TOKENS.items():
        assert converted.token_to_id(token) == i


def test_bytes_tokenizer_is_skipped_with_a_note(tmp_path):
    from perijax.data.tokenizer import load_tokenizer

    notes = []
    assert not hf.write_tokenizer_files(load_tokenizer("bytes"), tmp_path, 128, notes.append)
    assert "bytes tokenizer" in notes[0] and not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- CLI
def perijax(argv: list[str]) -> int:
    """`perijax export|import ...` through hf's own parsers and entry points."""
    parser = argparse.ArgumentParser(prog="perijax")
    hf_cli.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return {"export": hf_cli.run_export, "import": hf_cli.run_import}[args.command](args)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Peri-LN checkpoint trained for 2 steps on synthetic data."""
    overrides = {
        "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
        "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4",
        "model.num_kv_heads": "2", "model.d_ff": "64", "model.dtype": "float32",
        "train.global_batch_size": "8", "train.total_steps": "2", "train.log_every_steps": "1",
        "train.eval_every_steps": "0", "train.eval_batches": "1", "optim.warmup_steps": "1",
        "checkpoint.every_steps": "0",
    }  # fmt: skip
    cfg = config_lib.load(str(ROOT / "configs" / "tiny.py"), list(overrides.items()))
    workdir = tmp_path_factory.mktemp("run")
    train_lib.train(cfg, workdir, log=lambda s: None)
    return workdir / "checkpoints" / "2"


def test_cli_export_and_import_of_a_trained_checkpoint(tmp_path, trained, capsys):
    out, back = tmp_path / "hf", tmp_path / "back"
    assert perijax(["export", str(trained), "--out", str(out)]) == 0
    loaded = load_model(trained, overrides={"dtype": "float32"})
    theirs = load_hf(out)
    assert type(theirs).__name__ == "Glm4ForCausalLM"
    tokens = TOKENS % loaded.cfg.model.vocab_size
    diff = np.abs(np.asarray(loaded.model(jnp.asarray(tokens))) - hf_logits(theirs, tokens)).max()
    assert diff <= 1e-4
    config = json.loads((out / "config.json").read_text())
    assert config["max_position_embeddings"] == 16  # data.seq_len
    assert "no tokenizer" in capsys.readouterr().out  # synthetic data

    capsys.readouterr()
    export = ["export", str(trained), "--out"]
    assert perijax([*export, str(out)]) == 2
    assert "perijax: error: --out" in capsys.readouterr().err
    assert perijax([*export, str(tmp_path / "x"), "--target", "llama"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perijax: error: --target llama") and err.count("\n") == 1
    assert not (tmp_path / "x").exists()

    assert perijax(["import", str(out), "--out", str(back)]) == 0
    assert f"--restore {back}/checkpoints/0" in capsys.readouterr().out
    restored = load_model(back / "checkpoints" / "0", overrides={"dtype": "float32"})
    assert restored.cfg.model == loaded.cfg.model
    assert_params_equal(params_numpy(restored.model), params_numpy(loaded.model), exact=True)
    assert sorted(p.name for p in back.iterdir()) == ["checkpoints", "config.json"]

    assert perijax([*export, str(out), "--target", "gemma2", "--force"]) == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "gemma2"
    assert perijax(["import", str(out), "--out", str(back)]) == 2  # back is not empty
    assert perijax(["import", str(out), "--out", str(back), "--force"]) == 0
    restored = load_model(back, overrides={"dtype": "float32"})
    assert_params_equal(params_numpy(restored.model), params_numpy(loaded.model), exact=False)
    assert not list(tmp_path.glob(".*tmp*"))  # no staging folder left behind


def test_cli_import_refuses_with_one_line(tmp_path, capsys):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps(_hf_config("gemma2", **{
        "hidden_activation": "gelu_pytorch_tanh"})))  # fmt: skip
    assert perijax(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("perijax: error: cannot import Gemma2ForCausalLM with activation")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_training_continues_from_an_import(tmp_path, trained):
    """`perijax train --config OUT/config.json --restore OUT/checkpoints/0` runs."""
    loaded = load_model(trained, overrides={"dtype": "float32"})
    hf.export(loaded.model, loaded.cfg, tmp_path / "hf", log=print)
    hf.import_hf(tmp_path / "hf", tmp_path / "back", log=print)
    back = tmp_path / "back"
    overrides = ["--config.data.source=synthetic", "--config.data.seq_len=16",
                 "--config.train.total_steps=1", "--config.train.global_batch_size=8",
                 "--config.train.eval_batches=1"]  # fmt: skip
    restore = ["--restore", str(back / "checkpoints" / "0"), "--workdir", str(tmp_path / "cont")]
    assert cli.main(["train", "--config", str(back / "config.json"), *restore, *overrides]) == 0
