"""Loading trained models outside the training loop: a checkpoint's config and parameters, its
tokenizer, and writing parameters back as a checkpoint that `perijax train --restore` accepts.

Used by `perijax eval`, `perijax generate`, `perijax export` / `import` and the lm-evaluation-
harness adapter. Only the parameters are read from a checkpoint (not the optimizer moments).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from perijax import sharding as sharding_lib
from perijax.checkpoint import Checkpointer, flatten, resolve_restore_path
from perijax.config import CheckpointConfig, Config, ConfigError, resolve, to_dict
from perijax.model import Transformer, abstract_model

__all__ = ["Loaded", "load_model", "run_tokenizer", "write_checkpoint"]


@dataclasses.dataclass
class Loaded:
    """A model restored from a checkpoint.

    Attributes:
      cfg: the run's resolved config (as saved with the checkpoint).
      model: the Transformer with the checkpoint's parameters (float32, on `mesh`).
      step: the checkpoint's training step.
      path: the checkpoint step folder (`.../checkpoints/<step>`).
      mesh: the mesh the parameters live on.
    """

    cfg: Config
    model: Transformer
    step: int
    path: Path
    mesh: Mesh


def inference_mesh(cfg: Config, devices: list[Any] | None = None) -> Mesh:
    """A mesh for inference: the run's tensor and fsdp sizes where the devices allow (so a model
    that needed them still fits), the rest data-parallel; one device when nothing divides."""
    devices = devices if devices is not None else jax.devices()
    n = len(devices)
    fsdp = cfg.mesh.fsdp if cfg.mesh.fsdp > 0 and n % cfg.mesh.fsdp == 0 else 1
    tensor = cfg.mesh.tensor if n % (fsdp * cfg.mesh.tensor) == 0 else 1
    mesh_cfg = dataclasses.replace(cfg.mesh, data=-1, fsdp=fsdp, tensor=tensor, dcn_data=1)
    try:
        sharding_lib.check_model_fits_mesh(cfg.model, (n // (fsdp * tensor), fsdp, tensor))
        return sharding_lib.make_mesh(mesh_cfg, devices)
    except ConfigError:
        return sharding_lib.make_mesh(dataclasses.replace(mesh_cfg, fsdp=1, tensor=1), devices[:1])


def _open_checkpoint(path: str | Path) -> tuple[Checkpointer, int, Config]:
    """(an open read-only Checkpointer, step, config) of a checkpoint step folder, checkpoints
    folder or workdir (its latest checkpoint); the caller closes it (`.manager.close()`)."""
    directory, step = resolve_restore_path(str(path))
    ckpt = Checkpointer(directory, CheckpointConfig(async_save=False), read_only=True)
    try:
        step = step if step is not None else ckpt.latest_step()
        if step is None:
            raise ConfigError(f"{path}: no complete checkpoint found")
        config = ckpt.read_meta(step).get("config")
        if config is None:
            raise ConfigError(f"checkpoint {directory / str(step)} carries no config")
        config["model"]["dtype"] = "auto"  # the saved value is what the training backend used
        return ckpt, step, resolve(config)
    except BaseException:
        ckpt.manager.close()
        raise


def read_config(path: str | Path) -> tuple[Path, int, Config]:
    """(checkpoints folder, step, config) of a checkpoint step folder, checkpoints folder or
    workdir (its latest checkpoint)."""
    ckpt, step, cfg = _open_checkpoint(path)
    ckpt.manager.close()
    return ckpt.directory, step, cfg


def load_model(
    path: str | Path, *, mesh: Mesh | None = None, overrides: dict[str, Any] | None = None
) -> Loaded:
    """Restores the parameters of the checkpoint at `path` into a Transformer.

    Args:
      path: a checkpoint step folder (`WORKDIR/checkpoints/1200`), a checkpoints folder or a
        workdir (its latest checkpoint).
      mesh: where to place the parameters (default: `inference_mesh` over all devices).
      overrides: model settings that do not change the parameters: dtype, attention, remat,
        loss_chunk_len (e.g. {"dtype": "float32"}); anything else, such as scan_layers (it
        changes the parameter layout), is refused.

    Raises:
      ConfigError: no checkpoint there, or it does not match its own config.
    """
    ckpt, step, cfg = _open_checkpoint(path)
    try:
        allowed = {"dtype", "attention", "remat", "loss_chunk_len"}
        if overrides:
            bad = sorted(set(overrides) - allowed)
            if bad:
                raise ConfigError(f"cannot override model.{bad[0]} when loading a checkpoint")
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **overrides))
        mesh = mesh or inference_mesh(cfg)
        graphdef, abstract_params = nnx.split(abstract_model(cfg.model))
        shardings = sharding_lib.state_shardings(abstract_params, mesh)

        def with_sharding(sharding, variable):  # shardings is a prefix of the params tree
            return jax.tree.map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), variable
            )

        params = ckpt.restore_params(step, jax.tree.map(with_sharding, shardings, abstract_params))
    finally:
        ckpt.manager.close()
    model = nnx.merge(graphdef, params)
    return Loaded(cfg=cfg, model=model, step=step, path=ckpt.directory / str(step), mesh=mesh)


def run_tokenizer(cfg: Config):
    """The tokenizer the run's data was prepared with (perijax.data.tokenizer.Tokenizer), or
    None for synthetic data. Opens the dataset's metadata only (no hashing of shards)."""
    from perijax.data import tokenizer as tok_lib
    from perijax.data.datasets import open_datasets

    if cfg.data.source == "synthetic":
        return None
    try:
        data = open_datasets(
            cfg.data.source,
            path=cfg.data.path,
            vocab_size=cfg.model.vocab_size,
            cache_dir=cfg.data.cache_dir or None,
            remote=cfg.data.remote,
            val_fraction=cfg.data.val_fraction,
            log=lambda _: None,
            verify=False,
        )
    except ValueError as e:
        raise ConfigError(f"cannot open the run's data to find its tokenizer: {e}") from e
    if data.tokenizer_path:
        eod = None
        if data.eod_id is not None:
            from tokenizers import Tokenizer as HFTokenizer

            eod = HFTokenizer.from_file(data.tokenizer_path).id_to_token(data.eod_id)
        return tok_lib.JsonTokenizer(data.tokenizer_path, eod)
    if data.tokenizer in ("bytes", "cl100k_base"):
        return tok_lib.load_tokenizer(data.tokenizer)
    return None


def write_checkpoint(cfg: Config, params: nnx.State, workdir: str | Path, step: int = 0) -> Path:
    """Writes `params` as a complete training checkpoint (fresh optimizer state, step `step`)
    plus `config.json` into `workdir`, so that

        perijax train --config WORKDIR/config.json --restore WORKDIR/checkpoints/STEP

    continues from them. Returns the checkpoint step folder.

    Raises:
      ConfigError: `workdir` already holds checkpoints.
    """
    from perijax.step import create_state

    workdir = Path(workdir)
    folder = workdir / "checkpoints"
    if folder.is_dir() and any(c.name.isdigit() for c in folder.iterdir()):
        # Orbax would keep an existing step silently: refuse rather than mix two models.
        raise ConfigError(f"{folder} already holds checkpoints: write into an empty workdir")
    state = create_state(cfg)
    params = jax.tree.map(lambda p, x: jnp.asarray(x, p.dtype), state.params, params)
    state = state.replace(
        step=jnp.asarray(step, jnp.int32), params=params, opt_state=state.tx.init(params)
    )
    resolved = to_dict(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(json.dumps(resolved, indent=2) + "\n")
    ckpt = Checkpointer(folder, CheckpointConfig(async_save=False, keep=0))
    try:
        ckpt.save(step, state, None, {"config": resolved})
    finally:
        ckpt.close()
    return workdir / "checkpoints" / str(step)


def params_numpy(model: Transformer) -> dict[str, np.ndarray]:
    """{'blocks.0.attn.wq': array, ...}: the model's parameters as host float32 arrays (the
    names used in checkpoints, without the `params.` prefix)."""
    return {k: np.asarray(jax.device_get(v)) for k, v in flatten(nnx.state(model)).items()}
