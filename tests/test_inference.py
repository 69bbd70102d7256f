"""perijax.trained: parameters written as a checkpoint load back bit-exactly; a workdir that
already holds checkpoints is refused instead of silently keeping the old ones."""

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from perijax import config as config_lib
from perijax.config import ConfigError
from perijax.model import Transformer
from perijax.trained import load_model, params_numpy, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = {
    "data.source": "synthetic", "model.vocab_size": "64", "model.num_layers": "2",
    "model.d_model": "32", "model.num_heads": "4", "model.d_ff": "64",
}  # fmt: skip


def test_written_parameters_load_back_and_an_occupied_workdir_is_refused(tmp_path):
    cfg = config_lib.load(str(ROOT / "configs" / "tiny.py"), list(OVERRIDES.items()))
    first = Transformer(cfg.model, rngs=nnx.Rngs(params=1))
    path = write_checkpoint(cfg, nnx.state(first), tmp_path / "run")
    assert path == tmp_path / "run" / "checkpoints" / "0"
    loaded = params_numpy(load_model(path).model)
    for key, value in params_numpy(first).items():
        np.testing.assert_array_equal(loaded[key], value)

    second = Transformer(cfg.model, rngs=nnx.Rngs(params=2))
    leaves = zip(jax.tree.leaves(nnx.state(first)), jax.tree.leaves(nnx.state(second)), strict=True)
    assert not all(np.array_equal(a, b) for a, b in leaves)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        write_checkpoint(cfg, nnx.state(second), tmp_path / "run")
    for key, value in params_numpy(first).items():  # the first model is still the one there
        np.testing.assert_array_equal(params_numpy(load_model(path).model)[key], value)
