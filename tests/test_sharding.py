"""Meshes and sharding rules on 8 fake CPU devices: every parallelism layout trains exactly like
one device, parameters land where the rules table says, bad meshes fail before compiling."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from perijax import config as config_lib
from perijax import train as train_lib
from perijax.config import ConfigError, MeshConfig
from perijax.sharding import make_mesh, mesh_shape

ROOT = Path(__file__).resolve().parents[1]
MODEL = {
    "data.source": "synthetic", "data.seq_len": "16", "model.vocab_size": "64",
    "model.num_layers": "2", "model.d_model": "64", "model.num_heads": "8",
    "model.num_kv_heads": "4", "model.d_ff": "128", "model.dtype": "float32",
    "model.ln_placement": "peri", "model.tie_embeddings": "false",
    "train.global_batch_size": "16", "train.total_steps": "3", "train.log_every_steps": "1",
    "train.eval_every_steps": "0", "train.eval_batches": "1", "optim.warmup_steps": "0",
}  # fmt: skip


def config(**overrides):
    return config_lib.load(str(ROOT / "configs" / "tiny.py"), list({**MODEL, **overrides}.items()))


def run(tmp_path, name, devices=None, **overrides):
    result = train_lib.train(
        config(**overrides), tmp_path / name, log=lambda s: None, devices=devices
    )
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
    return [r["train/loss"] for r in rows if "train/loss" in r], result["state"]


@pytest.fixture(scope="module")
def single_device_losses(tmp_path_factory):
    losses, _ = run(tmp_path_factory.mktemp("single"), "run", devices=jax.devices()[:1])
    return losses


MESHES = {
    "data": (8, 1, 1),
    "fsdp": (1, 8, 1),
    "tensor": (1, 1, 8),
    "fsdp_x_tensor": (1, 2, 4),
    "data_x_fsdp_x_tensor": (2, 2, 2),
}


@pytest.mark.parametrize("name", MESHES)
def test_mesh_trains_like_one_device(tmp_path, single_device_losses, name):
    data, fsdp, tensor = MESHES[name]
    losses, state = run(
        tmp_path,
        name,
        **{"mesh.data": str(data), "mesh.fsdp": str(fsdp), "mesh.tensor": str(tensor)},
    )
    assert len(losses) == 3
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)
    assert state.params["embed"].get_value().sharding.mesh.shape == {
        "data": data,
        "fsdp": fsdp,
        "tensor": tensor,
    }


def test_gradient_accumulation_on_a_mesh_matches(tmp_path, single_device_losses):
    losses, _ = run(
        tmp_path, "accum", **{"mesh.fsdp": "4", "mesh.data": "2", "train.grad_accum_steps": "2"}
    )
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


@pytest.mark.parametrize("name", ["data_x_fsdp_x_tensor", "tensor"])
def test_chunked_loss_on_a_mesh_matches(tmp_path, single_device_losses, name):
    """The output head and loss in 4 chunks of 4 positions (perijax.loss), with the vocabulary
    split over `tensor`, train like one device with one chunk."""
    data, fsdp, tensor = MESHES[name]
    losses, _ = run(
        tmp_path,
        name,
        **{"mesh.data": str(data), "mesh.fsdp": str(fsdp), "mesh.tensor": str(tensor)},
        **{"model.loss_chunk_len": "4"},
    )
    np.testing.assert_allclose(losses, single_device_losses, rtol=1e-5)


def _spec(x) -> tuple:
    spec = tuple(x.get_value().sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def test_parameter_shardings_follow_the_rules_table():
    """fsdp=2 x tensor=4: embed -> fsdp, heads/mlp/vocab -> tensor, kv (head dim) replicated."""
    cfg = config(**{"mesh.data": "1", "mesh.fsdp": "2", "mesh.tensor": "4"})
    state = train_lib.init_state(cfg, train_lib.setup(cfg)[0])
    p = state.params
    attn, mlp = p["blocks"][0]["attn"], p["blocks"][0]["mlp"]
    assert _spec(p["embed"]) == ("tensor", "fsdp")  # (vocab, embed)
    assert _spec(p["lm_head"]) == ("fsdp", "tensor")  # (embed, vocab)
    assert _spec(attn["wq"]) == ("fsdp", "tensor")  # (embed, heads, kv)
    assert _spec(attn["wk"]) == ("fsdp", "tensor")  # 4 kv heads over tensor=4
    assert _spec(attn["wo"]) == ("tensor", None, "fsdp")  # (heads, kv, embed)
    assert _spec(mlp["w_gate"]) == ("fsdp", "tensor")  # (embed, mlp)
    assert _spec(mlp["w_down"]) == ("tensor", "fsdp")  # (mlp, embed)
    assert _spec(p["blocks"][0]["attn_output_norm"]["scale"]) == ("fsdp",)  # (embed,)
    # Adam moments are sharded exactly like their parameters.
    mu = state.opt_state[1][0].mu
    for param, moment in zip(
        jax.tree.leaves(p, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        jax.tree.leaves(mu, is_leaf=lambda x: isinstance(x, nnx.Variable)),
        strict=True,
    ):
        assert moment.get_value().sharding == param.get_value().sharding


def test_indivisible_dimension_is_replicated():
    """4 kv heads cannot split over tensor=8: they are replicated instead of failing."""
    cfg = config(**{"mesh.data": "1", "mesh.fsdp": "1", "mesh.tensor": "8"})
    state = train_lib.init_state(cfg, train_lib.setup(cfg)[0])
    assert _spec(state.params["blocks"][0]["attn"]["wk"]) == ()
    assert _spec(state.params["blocks"][0]["attn"]["wq"]) == (None, "tensor")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"mesh.data": "3"}, r"mesh data=3 x fsdp=1 x tensor=1 = 3 devices, but 8 are available"),
        ({"mesh.data": "-1", "mesh.fsdp": "-1"}, r"at most one of mesh.data, mesh.fsdp"),
        ({"mesh.data": "-1", "mesh.fsdp": "3"}, r"not divisible by the fixed axes' product 3"),
        ({"mesh.data": "1", "mesh.tensor": "8", "model.num_heads": "4", "model.num_kv_heads": "4"},
         r"mesh.tensor=8 must divide model.num_heads=4"),
        ({"mesh.data": "2", "mesh.tensor": "4", "model.d_ff": "90"},
         r"mesh.tensor=4 must divide model.d_ff=90"),
        ({"mesh.data": "8", "train.global_batch_size": "4"},
         r"micro-batch .* = 4\) must be divisible by mesh.data x mesh.fsdp = 8"),
        ({"mesh.dcn_data": "2"}, r"mesh.dcn_data=2 must equal the number of processes \(1\)"),
    ],
)  # fmt: skip
def test_bad_mesh_fails_before_compiling(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train_lib.train(config(**overrides), tmp_path / "run", log=lambda s: None)
    assert not (tmp_path / "run").exists()


def test_mesh_shape_resolves_minus_one():
    assert mesh_shape(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == (2, 2, 2)
    assert mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
