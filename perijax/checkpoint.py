"""Orbax checkpoints: the TrainState, the data iterator position and the resolved config saved
together, asynchronously; restore-or-init with a documented precedence; shape checks that name
the first mismatching parameter.

Layout: `WORKDIR/checkpoints/<step>/{state, data, meta}`. Orbax writes each step into a temporary
folder and renames it on commit (on object storage, where there is no rename, it marks a step
complete with a last file), so a process killed mid-save (even SIGKILL) leaves only complete
steps visible; `latest_step()` never returns an incomplete one. The folder may be a URL
(`gs://...`, perijax/storage.py).

The state is saved as a flat {path: array} dict (paths like `params.blocks.0.attn.wq`), so a
checkpoint does not depend on Python class names and a mismatch names the exact parameter.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from perijax import storage
from perijax.config import CheckpointConfig, ConfigError


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message is one line."""


def _key(path: tuple[Any, ...]) -> str:
    parts = []
    for p in path:
        name = getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))
        if name != "value":  # nnx Variable's payload attribute: not part of the name
            parts.append(str(name))
    return ".".join(parts)


def flatten(tree: Any) -> dict[str, Any]:
    """{'params.blocks.0.attn.wq': leaf, ...} for any pytree (TrainState, abstract state)."""
    return {_key(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(like: Any, flat: dict[str, Any]) -> Any:
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[_key(path)] for path, _ in paths])


def resolve_restore_path(path: str) -> tuple[Any, int | None]:
    """`--restore` accepts a checkpoint step folder (`.../checkpoints/1200`), a checkpoints
    folder, or a workdir, local or a URL; returns (checkpoints folder, step or None for the
    latest)."""
    p = storage.as_path(path)
    if p.name.isdigit() and p.parent.is_dir():
        if not (p / "state").exists():
            raise ConfigError(f"--restore {path}: not a complete checkpoint (no state/ inside)")
        return p.parent, int(p.name)
    for candidate in (p / "checkpoints", p):
        if candidate.is_dir() and any(c.name.isdigit() for c in candidate.iterdir()):
            return candidate, None
    raise ConfigError(f"--restore {path}: no checkpoint found there")


class Checkpointer:
    """Save/restore policy around an Orbax CheckpointManager (one per run)."""

    def __init__(self, directory: str | os.PathLike, cfg: CheckpointConfig, *, read_only=False):
        self.cfg = cfg
        self.directory = storage.as_path(directory)
        # A read-only manager logs three warnings about options it ignores; they say nothing
        # to a user who only reads a checkpoint.
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:
            absl_logger.setLevel(logging.ERROR)
        try:
            options = ocp.CheckpointManagerOptions(
                max_to_keep=cfg.keep or None,
                keep_period=cfg.keep_every_steps or None,
                enable_async_checkpointing=cfg.async_save,
                create=not read_only,
                read_only=read_only,
            )
            self.manager = ocp.CheckpointManager(
                storage.absolute(self.directory),
                options=options,
                item_handlers={  # declared up front so a fresh process can read metadata
                    "state": ocp.StandardCheckpointHandler(),
                    "data": ocp.JsonCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
        except OSError as e:
            raise CheckpointError(f"cannot use checkpoint folder {self.directory}: {e}") from e
        finally:
            absl_logger.setLevel(level)
        self._last_save_time = time.monotonic()
        self.last_saved_step: int | None = self.manager.latest_step()

    # ------------------------------------------------------------------------------- policy
    def due_by_steps(self, step: int) -> bool:
        """Whether `checkpoint.every_steps` asks for a save at `step` (the same answer on every
        process)."""
        return bool(self.cfg.every_steps and step % self.cfg.every_steps == 0)

    def due_by_time(self) -> bool:
        """Whether `checkpoint.every_minutes` have passed since the last save, by this
        process's clock. Processes' clocks differ, so a multi-process run takes process 0's
        answer (perijax/distributed.py `agree`)."""
        minutes = (time.monotonic() - self._last_save_time) / 60
        return bool(self.cfg.every_minutes and minutes >= self.cfg.every_minutes)

    # ------------------------------------------------------------------------------ save
    def save(self, step: int, state: Any, data_state: dict | None, meta: dict) -> None:
        """Starts an (async) save of `state` at `step`; returns once the device buffers are
        copied, while the write continues in the background."""
        if step == self.last_saved_step:
            return
        args = {
            "state": ocp.args.StandardSave(flatten(state)),
            "meta": ocp.args.JsonSave({**meta, "step": step}),
        }
        if data_state is not None:
            args["data"] = ocp.args.JsonSave(data_state)
        try:
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
        except OSError as e:  # e.g. no space left on device, read-only file system
            raise CheckpointError(f"saving checkpoint {step} failed: {e}") from e
        self._last_save_time = time.monotonic()
        self.last_saved_step = step

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"writing a checkpoint failed: {e}") from e

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # --------------------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def check_compatible(
        self,
        step: int,
        abstract_state: Any,
        defaults: dict[str, Any] | None = None,
        retired: Collection[str] = (),
    ) -> None:
        """Raises ConfigError naming the first parameter whose presence or shape differs
        (entries of `defaults` may be absent from the checkpoint, entries named in `retired` may
        be present)."""
        saved = self.manager.item_metadata(step)["state"]
        saved = {k: v for k, v in saved.items() if k not in retired}
        expected = flatten(abstract_state)
        expected = {k: v for k, v in expected.items() if k in saved or k not in (defaults or {})}
        # Parameters first: their names say what changed (the optimizer moments mirror them).
        for key in sorted(
            set(expected) | set(saved), key=lambda k: (not k.startswith("params"), k)
        ):
            if key not in saved:
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} does not match the config: "
                    f"'{key}' is not in the checkpoint (model shape or ln_placement changed?)"
                )
            if key not in expected:
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} does not match the config: "
                    f"the checkpoint has '{key}', which this config does not create "
                    "(model shape or ln_placement changed?)"
                )
            have, want = tuple(saved[key].shape), tuple(expected[key].shape)
            if have != want:
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} does not match the config: "
                    f"'{key}' has shape {have} in the checkpoint but {want} in the config"
                )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta record saved with checkpoint `step` (its config among others)."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
            "meta"
        ]

    def restore_params(self, step: int, targets: Any) -> Any:
        """Only the parameters of checkpoint `step`, onto the shardings of `targets` (a params
        tree of ShapeDtypeStruct carrying shardings); the optimizer moments stay on disk.
        Raises ConfigError naming the first parameter the checkpoint lacks or holds in another
        shape."""
        saved = self.manager.item_metadata(step)["state"]
        wanted = {f"params.{k}": v for k, v in flatten(targets).items()}
        for key, want in wanted.items():
            if key not in saved or tuple(saved[key].shape) != tuple(want.shape):
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} does not match its config at '{key}'"
                )
        with ocp.PyTreeCheckpointer() as reader:
            restored = reader.restore(
                storage.absolute(self.directory / str(step) / "state"),
                args=ocp.args.PyTreeRestore(
                    wanted,
                    restore_args=jax.tree.map(
                        lambda s: ocp.ArrayRestoreArgs(sharding=s.sharding), wanted
                    ),
                    partial_restore=True,
                ),
            )
        return unflatten(targets, {k[len("params.") :]: v for k, v in restored.items()})

    def restore(
        self,
        step: int,
        abstract_state: Any,
        defaults: dict[str, Any] | None = None,
        retired: Collection[str] = (),
    ) -> tuple[Any, dict | None, dict]:
        """Restores onto the shardings carried by `abstract_state` (any mesh). `defaults`
        {flat key: value} fill state entries that a checkpoint written before they existed
        lacks; entries named in `retired`, which a checkpoint written before they were removed
        holds, are read (as host arrays: they are scalars) and dropped."""
        self.check_compatible(step, abstract_state, defaults, retired)
        saved = self.manager.item_metadata(step)["state"]
        target = flatten(abstract_state)
        missing = {k: target.pop(k) for k in list(target) if k not in saved}
        old = [k for k in retired if k in saved]
        for key in old:
            target[key] = jax.ShapeDtypeStruct(tuple(saved[key].shape), saved[key].dtype)
        args = {
            "state": ocp.args.StandardRestore(target),
            "meta": ocp.args.JsonRestore(),
        }
        if (self.directory / str(step) / "data").exists():
            args["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        flat = dict(restored["state"])
        for key in old:
            del flat[key]
        for key, like in missing.items():
            flat[key] = jax.device_put(np.asarray(defaults[key], like.dtype), like.sharding)
        state = unflatten(abstract_state, flat)
        return state, restored.get("data"), restored["meta"]
