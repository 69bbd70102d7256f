"""KV-cache generation equals re-running the full forward pass; sampling settings behave as
documented; the `perijax generate` command."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perijax.config import ModelConfig
from perijax.generate import BUCKET, generate, sample_logits
from perijax.model import Transformer


def _model(**overrides) -> Transformer:
    cfg = ModelConfig(
        vocab_size=61,
        num_layers=2,
        d_model=32,
        num_heads=4,
        num_kv_heads=2,
        head_dim=12,
        d_ff=48,
        ln_placement="peri",
        dtype="float32",
    )
    cfg = dataclasses.replace(cfg, **overrides)
    model = Transformer(cfg, rngs=nnx.Rngs(params=3))
    # Larger weights than the init make the logits peaked, so greedy choices are not near-ties.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x * 4.0 if x.ndim > 1 else x, state)
    return nnx.merge(graphdef, state)


def _uncached(model, prompt, n, *, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """Reference: the full forward pass over the whole sequence for every new token, sampling
    with the same per-step keys as `generate`. The sequence is right-padded to a fixed length
    (one compile); causal attention keeps the padding out of the positions read."""
    keys = jax.random.split(jax.random.key(seed), -(-n // BUCKET) * BUCKET)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))
    seq = list(prompt)
    for i in range(n):
        padded = jnp.asarray([seq + [0] * (len(prompt) + n - len(seq))])
        logits = forward(state, padded)[:, len(seq) - 1]
        seq.append(int(sample_logits(logits, keys[i], temperature, top_k, top_p)[0]))
    return seq[len(prompt) :]


@pytest.mark.parametrize(
    "placement,scan", [("peri", False), ("pre", True), ("post", False), ("output", True)]
)
def test_cached_greedy_equals_full_forward(placement, scan):
    model = _model(ln_placement=placement, scan_layers=scan)
    prompts = [[5, 9, 1, 33, 2, 7, 7], [40], [3, 3, 8, 21]]  # different lengths: left padding
    got = generate(model, prompts, 12)
    for prompt, out in zip(prompts, got, strict=True):
        assert out == _uncached(model, prompt, 12)


def test_cached_sampling_equals_full_forward_with_same_keys():
    model = _model()
    prompt = [11, 2, 19, 4]
    for kwargs in [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=5),
        dict(temperature=1.3, top_p=0.8),
    ]:
        got = generate(model, [prompt], 10, seed=4, **kwargs)[0]
        assert got == _uncached(model, prompt, 10, seed=4, **kwargs)


def test_cached_logits_equal_full_forward_logits():
    """The cache's per-step logits (not just argmaxes) match the full pass."""
    model = _model(ln_placement="pre", qk_norm="full")
    tokens = jnp.asarray([[4, 8, 15, 16, 23, 42, 7, 1]])
    full = model(tokens)
    model.init_cache(1, 16)
    prefill = model.decode(tokens[:, :5], jnp.arange(5)[None])
    np.testing.assert_allclose(prefill, full[:, :5], atol=2e-5)
    for t in range(5, 8):
        step = model.decode(tokens[:, t : t + 1], jnp.asarray([[t]]))
        np.testing.assert_allclose(step[:, 0], full[:, t], atol=2e-5)
    assert int(model.cache_index[...]) == 8


def test_stop_tokens_and_lengths():
    model = _model()
    free = generate(model, [[1, 2, 3]], 9)[0]
    assert len(free) == 9
    stop = free[3]
    cut = generate(model, [[1, 2, 3]], 9, stop_tokens=[stop])[0]
    assert cut == free[: free.index(stop) + 1]


def test_sampling_restrictions():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draw = lambda **kw: {int(sample_logits(logits, k, 1.0, **kw)[0]) for k in keys}  # noqa: E731
    assert draw(top_k=0, top_p=1.0) == {0, 1, 2, 3}
    assert draw(top_k=2, top_p=1.0) == {0, 1}
    assert draw(top_k=0, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 >= 0.7
    assert draw(top_k=0, top_p=0.4) == {0}
    assert int(sample_logits(logits, keys[0], 0.0, 0, 1.0)[0]) == 0


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], 4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], 0)
    with pytest.raises(ValueError, match=r"\[0, 61\)"):
        generate(model, [[99]], 3)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], 3, top_p=0.0)


def test_generate_command_on_a_checkpoint(tmp_path, capsys):
    """`perijax generate CHECKPOINT --ids` decodes what `generate` gives for the restored
    parameters; a missing checkpoint is a one-line error."""
    from pathlib import Path

    from perijax import cli
    from perijax import config as config_lib
    from perijax import train as train_lib
    from perijax.trained import load_model

    root = Path(__file__).resolve().parents[1]
    overrides = {
        "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
        "model.num_layers": "2", "model.d_model": "32", "model.num_heads": "4",
        "model.d_ff": "64", "model.dtype": "float32", "train.global_batch_size": "8",
        "train.total_steps": "3", "train.eval_every_steps": "0", "train.eval_batches": "1",
    }  # fmt: skip
    cfg = config_lib.load(str(root / "configs" / "tiny.py"), list(overrides.items()))
    result = train_lib.train(cfg, tmp_path / "run", log=lambda s: None)
    expected = generate(load_model(tmp_path / "run").model, [[1, 2, 3]], 5)[0]
    trained = nnx.merge(result["state"].graphdef, result["state"].params)
    assert generate(trained, [[1, 2, 3]], 5)[0] == expected

    code = cli.main(["generate", str(tmp_path / "run"), "--ids", "--prompt", "1 2 3",
                     "--max-new-tokens", "5"])  # fmt: skip
    assert code == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected]

    assert cli.main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("perijax: error:") and "no checkpoint" in err and "\n" not in err
    assert cli.main(["generate", str(tmp_path / "run"), "--prompt", "x"]) == 2
    assert "synthetic" in capsys.readouterr().err
