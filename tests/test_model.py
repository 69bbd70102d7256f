"""The model against an independent NumPy forward pass: every placement and norm type computes
exactly its equation (docs/paper.md), and creates exactly the norms it needs."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from perijax.attention import softmax_attention
from perijax.config import ModelConfig
from perijax.model import Block, Context, Transformer, count_params, rotary_tables

PLACEMENTS = ["pre", "post", "peri", "output"]


# ----------------------------------------------------------------------- NumPy reference (f64)
def np_norm(x, scale, bias, kind, eps):
    x = x.astype(np.float64)
    if kind == "layernorm":
        x = x - x.mean(-1, keepdims=True)
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y


def np_rope(x, theta):
    """x: [T, N, Dh]; rotates pairs (i, i + Dh/2)."""
    t, _, dh = x.shape
    half = dh // 2
    inv = theta ** (-np.arange(half) / half)
    ang = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def np_attention(x, w, cfg):
    """x: [T, D] (one sequence)."""
    h, k, dh = cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    t = x.shape[0]
    q = np.einsum("td,dhk->thk", x, w["wq"])
    kk = np.einsum("td,dhk->thk", x, w["wk"])
    v = np.einsum("td,dhk->thk", x, w["wv"])
    if cfg.qk_norm == "per_head":
        q = np_norm(q, w.get("q_scale"), None, "rmsnorm", cfg.norm_eps)
        kk = np_norm(kk, w.get("k_scale"), None, "rmsnorm", cfg.norm_eps)
    elif cfg.qk_norm == "full":
        q = np_norm(q.reshape(t, -1), w.get("q_scale"), None, "rmsnorm", cfg.norm_eps)
        kk = np_norm(kk.reshape(t, -1), w.get("k_scale"), None, "rmsnorm", cfg.norm_eps)
        q, kk = q.reshape(t, h, dh), kk.reshape(t, k, dh)
    q, kk = np_rope(q, cfg.rope_theta), np_rope(kk, cfg.rope_theta)
    out = np.zeros((t, h, dh))
    for head in range(h):
        kv = head // (h // k)  # query head -> kv head
        s = q[:, head] @ kk[:, kv].T / math.sqrt(dh)
        s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[:, head] = p @ v[:, kv]
    return np.einsum("thk,hkd->td", out, w["wo"])


def np_mlp(x, w):
    g = x @ w["w_gate"]
    return (g / (1 + np.exp(-g)) * (x @ w["w_up"])) @ w["w_down"]


def np_block(x, w, cfg):
    """The four equations of docs/paper.md, written independently of perijax.norms."""

    def norm(name):
        return lambda y: np_norm(
            y, w.get(f"{name}/scale"), w.get(f"{name}/bias"), cfg.norm_type, cfg.norm_eps
        )

    attn = lambda y: np_attention(y, w["attn"], cfg)  # noqa: E731
    mlp = lambda y: np_mlp(y, w["mlp"])  # noqa: E731
    for sub, f in (("attn", attn), ("mlp", mlp)):
        if cfg.ln_placement == "pre":
            x = x + f(norm(f"{sub}_input_norm")(x))
        elif cfg.ln_placement == "post":
            x = norm(f"{sub}_residual_norm")(x + f(x))
        elif cfg.ln_placement == "peri":
            x = x + norm(f"{sub}_output_norm")(f(norm(f"{sub}_input_norm")(x)))
        elif cfg.ln_placement == "output":
            x = x + norm(f"{sub}_output_norm")(f(x))
    return x


def weights(module) -> dict:
    """Flat {path: float64 array} of a module's parameters, plus attn/mlp sub-dicts."""
    flat = {
        "/".join(map(str, path)): np.asarray(v[...], np.float64)
        for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param))
    }
    return flat


def param_paths(cfg: ModelConfig) -> set[str]:
    """Parameter paths of the abstract model (nothing allocated)."""
    abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}


def block_weights(flat: dict, prefix: str = "") -> dict:
    w = {k[len(prefix) :]: v for k, v in flat.items() if k.startswith(prefix)}
    w["attn"] = {
        k.split("/")[1]: v for k, v in w.items() if k.startswith("attn/") and "norm" not in k
    }
    w["attn"]["q_scale"] = w.get("attn/q_norm/scale")
    w["attn"]["k_scale"] = w.get("attn/k_norm/scale")
    w["mlp"] = {k.split("/")[1]: v for k, v in w.items() if k.startswith("mlp/")}
    return w


def randomize_norms(module, seed: int) -> None:
    """Norm scales/biases start at 1/0; perturb them so a swapped norm cannot go unnoticed."""
    rng = np.random.default_rng(seed)
    for path, v in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        if any(str(p).endswith("norm") for p in path):
            v[...] = jnp.asarray(v[...] + 0.3 * rng.standard_normal(v.shape), v.dtype)


def small_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=61, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=48,
        norm_eps=1e-5, init_std=0.2, dtype="float32",
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def apply_block(block: Block, x: np.ndarray) -> jax.Array:
    """The block on x [B, T, D] at positions 0..T-1, as the model's layer loop calls it (its
    stream probes' statistics captured and dropped)."""
    cfg = block.attn.cfg
    ctx = Context(rotary_tables(jnp.arange(x.shape[1]), cfg.dim_per_head, cfg.rope_theta))
    return nnx.capture(block, nnx.Intermediate)(jnp.asarray(x), ctx)[0]


# --------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_block_matches_numpy_equation(placement, norm_type):
    cfg = small_cfg(ln_placement=placement, norm_type=norm_type)
    block = Block(cfg, rngs=nnx.Rngs(3))
    randomize_norms(block, 4)
    x = np.random.default_rng(0).standard_normal((2, 7, cfg.d_model)).astype(np.float32) * 2.0
    got = np.asarray(apply_block(block, x))
    w = block_weights(weights(block))
    want = np.stack([np_block(x[b].astype(np.float64), w, cfg) for b in range(2)])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("qk_norm", ["per_head", "full"])
def test_qk_norm_matches_numpy(qk_norm):
    cfg = small_cfg(ln_placement="peri", qk_norm=qk_norm)
    block = Block(cfg, rngs=nnx.Rngs(5))
    randomize_norms(block, 6)
    x = np.random.default_rng(1).standard_normal((1, 9, cfg.d_model)).astype(np.float32)
    got = np.asarray(apply_block(block, x))
    want = np_block(x[0].astype(np.float64), block_weights(weights(block)), cfg)
    np.testing.assert_allclose(got[0], want, atol=1e-5, rtol=0)
    expected = {"per_head": (cfg.dim_per_head,), "full": (cfg.num_heads * cfg.dim_per_head,)}
    assert block.attn.q_norm.scale.shape == expected[qk_norm]


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_transformer_matches_numpy(placement):
    """Embedding, optional embedding norm, blocks, final-norm rule and tied head together."""
    cfg = small_cfg(ln_placement=placement, embed_norm=True, tie_embeddings=True)
    model = Transformer(cfg, rngs=nnx.Rngs(7))
    randomize_norms(model, 8)
    tokens = np.random.default_rng(2).integers(0, cfg.vocab_size, (1, 6))
    got = np.asarray(model(jnp.asarray(tokens)))
    flat = weights(model)
    x = flat["embed"][tokens[0]]
    x = np_norm(x, flat["embed_norm/scale"], None, "rmsnorm", cfg.norm_eps)
    for layer in range(cfg.num_layers):
        x = np_block(x, block_weights(flat, f"blocks/{layer}/"), cfg)
    if placement != "post":
        x = np_norm(x, flat["final_norm/scale"], None, "rmsnorm", cfg.norm_eps)
    else:
        assert "final_norm/scale" not in flat
    np.testing.assert_allclose(got[0], x @ flat["embed"].T, atol=1e-5, rtol=0)


EXPECTED_BLOCK_NORMS = {
    "pre": {"attn_input_norm", "mlp_input_norm"},
    "post": {"attn_residual_norm", "mlp_residual_norm"},
    "peri": {"attn_input_norm", "attn_output_norm", "mlp_input_norm", "mlp_output_norm"},
    "output": {"attn_output_norm", "mlp_output_norm"},
}


@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
@pytest.mark.parametrize("placement", PLACEMENTS)
def test_parameter_tree_has_exactly_the_placement_norms(placement, norm_type):
    cfg = small_cfg(ln_placement=placement, norm_type=norm_type)
    paths = param_paths(cfg)
    norm_params = {p for p in paths if "norm" in p}
    leaves = {"scale", "bias"} if norm_type == "layernorm" else {"scale"}
    expected = {
        f"blocks/{layer}/{name}/{leaf}"
        for layer in range(cfg.num_layers)
        for name in EXPECTED_BLOCK_NORMS[placement]
        for leaf in leaves
    }
    if placement != "post":
        expected |= {f"final_norm/{leaf}" for leaf in leaves}
    assert norm_params == expected
    assert {p for p in paths if "norm" not in p} == {"embed", "lm_head"} | {
        f"blocks/{layer}/{name}"
        for layer in range(cfg.num_layers)
        for name in (
            "attn/wq",
            "attn/wk",
            "attn/wv",
            "attn/wo",
            "mlp/w_gate",
            "mlp/w_up",
            "mlp/w_down",
        )
    }


def test_frozen_norm_scale_has_no_parameters():
    cfg = small_cfg(ln_placement="peri", learnable_norm_scale=False)
    paths = param_paths(cfg)
    assert not [p for p in paths if "norm" in p]
    block = Block(cfg, rngs=nnx.Rngs(1))
    x = np.random.default_rng(3).standard_normal((1, 5, cfg.d_model)).astype(np.float32)
    want = np_block(x[0].astype(np.float64), block_weights(weights(block)), cfg)
    got = np.asarray(apply_block(block, x))[0]
    np.testing.assert_allclose(got, want, atol=1e-5)


def test_causal_future_tokens_do_not_change_past_logits():
    cfg = small_cfg(ln_placement="peri")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    a = jnp.asarray([[1, 2, 3, 4, 5, 6]])
    b = a.at[0, 4:].set(9)
    np.testing.assert_allclose(model(a)[0, :4], model(b)[0, :4], atol=1e-6)


def test_norm_statistics_in_float32_under_bfloat16():
    """In bfloat16 compute the norm output equals the float32 norm rounded once to bfloat16."""
    from perijax.norms import Norm

    norm = Norm(64, norm_type="rmsnorm", eps=1e-6, learnable=True, param_dtype=jnp.float32)
    x = (np.random.default_rng(0).standard_normal((4, 64)) * 300).astype(np.float32)
    xb = jnp.asarray(x, jnp.bfloat16)
    got = norm(xb)
    assert got.dtype == jnp.bfloat16
    want = np_norm(np.asarray(xb, np.float64), None, None, "rmsnorm", 1e-6)
    np.testing.assert_array_equal(
        np.asarray(got), np.asarray(jnp.asarray(want, jnp.float32).astype(jnp.bfloat16))
    )


def test_depth_scaled_init_shrinks_output_projections():
    cfg = small_cfg(num_layers=8, d_model=64, d_ff=256, init_std=0.02, depth_scaled_init=True)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    std = lambda a: float(jnp.std(a[...]))  # noqa: E731
    target = 0.02 / math.sqrt(16)
    assert abs(std(model.blocks[0].mlp.w_down) - target) / target < 0.1
    assert abs(std(model.blocks[0].attn.wo) - target) / target < 0.1
    assert abs(std(model.blocks[0].mlp.w_up) - 0.02) / 0.02 < 0.1


def test_count_params_matches_materialized_model():
    cfg = small_cfg(ln_placement="peri", qk_norm="full")
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    counts = count_params(cfg)
    assert counts["total"] == n
    assert counts["embedding"] == 2 * cfg.vocab_size * cfg.d_model


def test_scan_layers_gives_identical_weights_and_outputs():
    """Same seed: the scanned model's stacked weights are the unrolled model's, and so are its
    logits and gradients."""
    from perijax.model import stack_layers

    cfg = small_cfg(ln_placement="peri", num_layers=3, qk_norm="per_head")
    unrolled = Transformer(cfg, rngs=nnx.Rngs(11))
    scanned = Transformer(dataclasses.replace(cfg, scan_layers=True), rngs=nnx.Rngs(11))
    stacked = stack_layers(list(unrolled.blocks))
    for a, b in zip(
        jax.tree.leaves(nnx.state(stacked)), jax.tree.leaves(nnx.state(scanned.blocks)), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)))
    apply = nnx.jit(lambda model, t: model(t))
    # Same math, differently fused loops: equal to float32 rounding (logits are O(1)).
    np.testing.assert_allclose(apply(scanned, tokens), apply(unrolled, tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scan", [False, True])
def test_remat_changes_nothing_numerically(scan):
    def loss_and_grads(remat):
        cfg = small_cfg(ln_placement="peri", scan_layers=scan, remat=remat)
        model = Transformer(cfg, rngs=nnx.Rngs(2))
        graphdef, params = nnx.split(model)
        tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 8)))

        def loss(p):
            return jnp.mean(nnx.merge(graphdef, p)(tokens) ** 2)

        return jax.jit(jax.value_and_grad(loss))(params)

    base_loss, base_grads = loss_and_grads("none")
    for remat in ("minimal", "full"):
        loss, grads = loss_and_grads(remat)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(base_grads), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_mixed_precision_einsum_gradients():
    """perijax.model.mixed_einsum: with float32 operands its gradients equal plain autodiff of
    jnp.einsum; with bfloat16 compute every matmul of the backward pass takes bfloat16 inputs
    (plain autodiff would feed a float32 cotangent), and the float32 parameter's gradient comes
    back in float32."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from perijax.model import mixed_einsum

    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, 5, 8), jnp.float32)
    w = jax.random.normal(kw, (8, 3, 4), jnp.float32)
    spec = "btd,dhk->bthk"

    def ours(x, w):
        return jnp.sum(jnp.sin(mixed_einsum(spec, x, w)))

    def plain(x, w):
        return jnp.sum(jnp.sin(jnp.einsum(spec, x, w)))

    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    xb = x.astype(jnp.bfloat16)
    grad = jax.grad(lambda x, w: ours(x, w).astype(jnp.float32), (0, 1))
    hlo = jax.jit(grad).lower(xb, w).as_text()
    dots = [line for line in hlo.splitlines() if "dot_general" in line]
    assert len(dots) == 3, dots  # forward, input gradient, weight gradient
    for line in dots:
        operands = line.rsplit(":", 1)[1].split("->")[0]
        assert operands.count("bf16>") == 2, line
    gx, gw = grad(xb, w)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32


@pytest.mark.parametrize("tie", [True, False])
def test_bfloat16_compute_trains_on_cpu(tie):
    """bfloat16 compute (f32 params) runs forward and backward on one CPU device for every
    placement, and its loss is within bfloat16 rounding of the float32 loss."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from test_loss import cross_entropy

    from perijax.config import ModelConfig
    from perijax.model import Transformer

    tokens = jax.random.randint(jax.random.key(1), (4, 17), 0, 64)
    for placement in ("pre", "post", "peri", "output"):
        base = ModelConfig(
            vocab_size=64, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
            ln_placement=placement, tie_embeddings=tie, dtype="float32",
        )  # fmt: skip
        losses = {}
        for dtype in ("float32", "bfloat16"):
            cfg = dataclasses.replace(base, dtype=dtype)
            graphdef, params = nnx.split(Transformer(cfg, rngs=nnx.Rngs(params=0)))

            def loss(params, graphdef=graphdef):
                total, count = cross_entropy(
                    nnx.merge(graphdef, params)(tokens[:, :-1]), tokens[:, 1:]
                )
                return total / count

            value, grads = jax.jit(jax.value_and_grad(loss))(params)
            assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
            assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))
            losses[dtype] = float(value)
        np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)


def test_rotary_tables_are_constants_of_the_compiled_forward():
    """Positions 0..T-1 give tables computed once on the host (float64, rounded once) that agree
    with the device formula; the compiled training forward and backward then evaluate no sine or
    cosine at all (XLA:CPU fused them into every rotary multiply, per row, head and layer)."""
    t, dh, theta = 64, 16, 10_000.0
    host = rotary_tables(np.arange(t), dh, theta)
    device = rotary_tables(jnp.arange(t), dh, theta)
    angle = np.arange(t)[:, None] * theta ** (-np.arange(dh // 2) / (dh // 2))
    np.testing.assert_array_equal(host.sin, np.sin(angle).astype(np.float32))
    np.testing.assert_allclose(device.sin, host.sin, atol=2e-5)
    np.testing.assert_allclose(device.cos, host.cos, atol=2e-5)

    cfg = ModelConfig(vocab_size=64, num_layers=2, d_model=32, num_heads=2, d_ff=64)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tokens = jnp.zeros((2, t), jnp.int32)

    def loss(params):
        return jnp.mean(nnx.merge(graphdef, params)(tokens))

    hlo = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    assert " sine(" not in hlo and " cosine(" not in hlo
    assert " sine(" in jax.jit(lambda p: rotary_tables(p, dh, theta)).lower(tokens[0]).as_text(
        "hlo"
    )


@pytest.mark.parametrize("shape", [(5, 8), (2, 3, 8), (2, 3, 4, 8)])
def test_norm_scale_gradient_is_autodiff_as_a_product(shape):
    """`scale_rows` differentiates exactly like `h * scale`, with the scale gradient's sum over
    rows computed as a product with a ones vector (one dot, no reduction over the rows)."""
    from perijax.tuning.cpu_kernels import scale_rows

    rng = np.random.default_rng(0)
    h, g = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(2))
    scale = jnp.asarray(rng.standard_normal(shape[-1]), jnp.float32)
    got_y, got_vjp = jax.vjp(scale_rows, h, scale)
    want_y, want_vjp = jax.vjp(lambda a, b: a * b, h, scale)
    np.testing.assert_array_equal(got_y, want_y)
    for got, want in zip(got_vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    dscale = jax.jit(lambda h, s, g: jax.vjp(scale_rows, h, s)[1](g)[1])
    hlo = dscale.lower(h, scale, g).compile().as_text()
    assert " dot(" in hlo and " reduce(" not in hlo and "reduce-window(" not in hlo
    assert "operand_precision={highest,highest}" in hlo  # float32 on every backend


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", [(5, 64), (2, 3, 64), (2, 3, 4, 64)])
def test_rmsnorm_backward_equals_autodiff(shape, dtype):
    """`rms_norm`'s written-out backward pass equals autodiff of the plain formula, and its two
    sums are float32 dots (no reduction over the rows)."""
    from perijax.tuning.cpu_kernels import rms_norm

    def plain(x, scale, eps=1e-6):
        h = x.astype(jnp.float32)
        h = h * jax.lax.rsqrt(jnp.mean(jnp.square(h), axis=-1, keepdims=True) + eps)
        return (h * scale).astype(x.dtype)

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal(shape) * 3, dtype)
    g = jnp.asarray(rng.standard_normal(shape), dtype)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]), jnp.float32)
    got_y, got_vjp = jax.vjp(lambda x, s: rms_norm(x, s, 1e-6), x, scale)
    want_y, want_vjp = jax.vjp(plain, x, scale)
    np.testing.assert_array_equal(np.asarray(got_y, np.float32), np.asarray(want_y, np.float32))
    (got_dx, got_ds), (want_dx, want_ds) = got_vjp(g), want_vjp(g)
    assert got_dx.dtype == x.dtype and got_ds.dtype == jnp.float32
    # bfloat16: the two gradients round to bfloat16 differently, by at most a unit or two.
    tol = {"float32": 1e-5, "bfloat16": 2e-2}[dtype]
    np.testing.assert_allclose(np.asarray(got_dx, np.float32), np.asarray(want_dx, np.float32),
                               rtol=tol, atol=tol)  # fmt: skip
    np.testing.assert_allclose(got_ds, want_ds, rtol=1e-5, atol=1e-5)

    bwd = jax.jit(lambda x, s, g: jax.vjp(lambda x, s: rms_norm(x, s, 1e-6), x, s)[1](g))
    hlo = bwd.lower(x, scale, g).compile().as_text()
    assert hlo.count("operand_precision={highest,highest}") == 2


@pytest.mark.parametrize("learnable", [True, False])
@pytest.mark.parametrize("norm_type", ["rmsnorm", "layernorm"])
def test_cpu_normalizer_equals_the_formula(norm_type, learnable):
    """What `tuning.normalizer` hands `Norm` on CPU computes the values and gradients of the
    formula in perijax.norms that every other backend differentiates by autodiff."""
    from perijax import norms, tuning

    formula = norms.NORMALIZE[norm_type]
    with tuning.planning_for("cpu"):
        cpu = tuning.normalizer(norm_type, formula)
    with tuning.planning_for("gpu"):
        assert tuning.normalizer(norm_type, formula) is formula
    assert cpu is not formula
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 5, 16)) * 3, jnp.float32)
    g = jnp.asarray(rng.standard_normal((3, 5, 16)), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 1.5, 16), jnp.float32) if learnable else None
    bias = None
    if learnable and norm_type == "layernorm":
        bias = jnp.asarray(rng.standard_normal(16), jnp.float32)
    args = [a for a in (x, scale, bias) if a is not None]

    def fn(normalize):
        def f(*a):
            it = iter(a)
            return normalize(next(it), next(it) if scale is not None else None,
                             next(it) if bias is not None else None, 1e-6)  # fmt: skip

        return jax.vjp(f, *args)

    (got, got_vjp), (want, want_vjp) = fn(cpu), fn(formula)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    for a, b in zip(got_vjp(g), want_vjp(g), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _attention_inputs(dtype, masked):
    b, t, kv, g, dh = 2, 12, 2, 3, 8  # grouped queries: 3 query heads per key/value head
    keys = jax.random.split(jax.random.key(7), 5)
    q = jax.random.normal(keys[0], (b, t, kv, g, dh)).astype(dtype)
    k = jax.random.normal(keys[1], (b, t, kv, dh)).astype(dtype)
    v = jax.random.normal(keys[2], (b, t, kv, dh)).astype(dtype)
    cotangent = jax.random.normal(keys[3], (b, t, kv, g, dh))
    if masked:  # a decoding-style mask per batch row; every query keeps itself
        mask = jax.random.bernoulli(keys[4], 0.6, (b, t, t)) | jnp.eye(t, dtype=bool)
        mask = mask[:, None, None]
    else:
        mask = np.tril(np.ones((t, t), dtype=bool))
    return (q, k, v), mask, cotangent


def _attention_by_autodiff(q, k, v, mask):
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(q.shape[-1])
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bkgts,bskd->btkgd", jax.nn.softmax(logits, axis=-1), v)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_backward_equals_autodiff(dtype, masked):
    """The written-out backward (FlashAttention's rowsum(do * o)) gives autodiff's gradients of
    the plain formula: to float32 rounding in float32, within bfloat16 rounding in bfloat16."""
    inputs, mask, cotangent = _attention_inputs(dtype, masked)

    def loss(fn):
        return lambda *qkv: jnp.sum(fn(*qkv, mask).astype(jnp.float32) * cotangent)

    value, grads = jax.value_and_grad(loss(softmax_attention), argnums=(0, 1, 2))(*inputs)
    ref_value, ref_grads = jax.value_and_grad(loss(_attention_by_autodiff), argnums=(0, 1, 2))(
        *inputs
    )
    tol, value_tol = (2e-6, 1e-5) if dtype == "float32" else (1e-2, 3e-2)
    assert abs(value - ref_value) <= value_tol * abs(ref_value)
    for g, ref in zip(grads, ref_grads, strict=True):
        assert g.dtype == jnp.dtype(dtype)
        err = jnp.linalg.norm(g.astype(jnp.float32) - ref) / jnp.linalg.norm(ref)
        assert err < tol, err


def test_attention_keeps_the_probabilities_in_the_compute_dtype():
    """For its backward pass the attention keeps one [T, S] array per head, the bfloat16
    probabilities; autodiff of the same formula keeps float32 ones too."""
    inputs, mask, _ = _attention_inputs("bfloat16", masked=False)
    t = inputs[0].shape[1]

    def squares(fn):
        _, backward = jax.vjp(lambda *qkv: fn(*qkv, mask), *inputs)
        leaves = jax.tree.leaves(backward)
        return sorted(str(a.dtype) for a in leaves if a.shape[-2:] == (t, t) and a.dtype != bool)

    assert squares(softmax_attention) == ["bfloat16"]
    assert "float32" in squares(_attention_by_autodiff)


def test_block_call_is_its_two_residual_lines():
    """`Block.__call__` is the placement equation twice (attention, then MLP): after its
    docstring, two statements, each a call of `norms.residual`."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(Block.__call__)))
    body = tree.body[0].body
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    assert len(body) == 2
    calls = [statement.value for statement in body]
    assert all(isinstance(c, ast.Call) and getattr(c.func, "id", None) == "residual" for c in calls)
