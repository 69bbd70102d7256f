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

import contextlib
import logging
import os
import re
import time
from collections.abc import Collection, Iterator
from typing import Any

import jax
import jax.numpy as jnp
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


def _digest(x: jax.Array) -> jax.Array:
    """A position-weighted checksum of one array's bytes (uint32, wrapping): every element's
    bits xor-ed with a multiple of its index, mixed, summed. Integer sums are exact, so the
    value does not depend on the order of the reduction, the sharding or the backend."""
    size = np.dtype(x.dtype).itemsize
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[size]
        bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
    index = jax.lax.broadcasted_iota(jnp.uint32, x.shape, 0) if x.ndim else jnp.uint32(0)
    for axis in range(1, x.ndim):
        index = index * jnp.uint32(x.shape[axis]) + jax.lax.broadcasted_iota(
            jnp.uint32, x.shape, axis
        )
    mixed = (bits ^ (index * jnp.uint32(0x9E3779B1))) * jnp.uint32(0x85EBCA77)
    return jnp.sum(mixed ^ (mixed >> 13), dtype=jnp.uint32)


_digests = jax.jit(lambda flat: {k: _digest(v) for k, v in flat.items()})


def digests(flat: dict[str, Any]) -> dict[str, int]:
    """{key: checksum} of a flat state, computed on the devices that hold each array (one
    pass over the bytes; the same on every process)."""
    if not flat:
        return {}
    values = _digests(flat)
    return {k: int(np.asarray(v.addressable_data(0))) for k, v in values.items()}


_STATUS = re.compile(
    r"\b(DATA_LOSS|NOT_FOUND|FAILED_PRECONDITION|INVALID_ARGUMENT|OUT_OF_RANGE|INTERNAL|"
    r"UNKNOWN|ABORTED|UNAVAILABLE|PERMISSION_DENIED)\b:? ?([^\n]*)"
)


def _what_failed(e: BaseException) -> str:
    """One line for an exception from Orbax / TensorStore (their messages run to pages): the
    status and message of the innermost TensorStore error if there is one, else the first line."""
    seen, chain = set(), []
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for err in reversed(chain):
        m = _STATUS.search(str(err))
        if m:
            return f"{m.group(1)}: {m.group(2)[:200]}".rstrip(": ")
    lines = [x.strip() for x in str(chain[0]).splitlines() if x.strip()]
    return f"{type(chain[0]).__name__}: {(lines[0] if lines else '')[:200]}"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Orbax, TensorStore and asyncio log every failed read of a bad checkpoint at length; the
    one-line CheckpointError says what failed instead."""
    loggers = [logging.getLogger(name) for name in ("absl", "orbax", "asyncio", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


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
        flat = flatten(state)
        # A checksum of every array, saved beside it and verified by every restore.
        meta = {**meta, "step": step, "digests": digests(flat)}
        args = {
            "state": ocp.args.StandardSave(flat),
            "meta": ocp.args.JsonSave(meta),
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

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

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
        saved = self._state_metadata(step)
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

    def _unreadable(self, step: int, e: BaseException) -> CheckpointError:
        return CheckpointError(
            f"checkpoint {self.directory / str(step)} cannot be read: {_what_failed(e)}"
        )

    def _state_metadata(self, step: int) -> dict[str, Any]:
        try:
            return dict(self.manager.item_metadata(step)["state"])
        except Exception as e:  # truncated or missing metadata files
            raise self._unreadable(step, e) from e

    def verify(self, step: int, flat: dict[str, Any], meta: dict[str, Any]) -> None:
        """Raises CheckpointError when an array of `flat` (restored from `step`) differs from
        the checksum saved with it. Checkpoints written before checksums existed pass."""
        saved = meta.get("digests") or {}
        got = digests({k: v for k, v in flat.items() if k in saved})
        for key in sorted(got, key=lambda k: (not k.startswith("params"), k)):
            if got[key] != saved[key]:
                raise CheckpointError(
                    f"checkpoint {self.directory / str(step)} is corrupt: '{key}' does not "
                    "match the checksum saved with it"
                )

    def read_meta(self, step: int) -> dict[str, Any]:
        """The meta record saved with checkpoint `step` (its config among others)."""
        try:
            return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))[
                "meta"
            ]
        except Exception as e:
            raise self._unreadable(step, e) from e

    def restore_params(self, step: int, targets: Any) -> Any:
        """Only the parameters of checkpoint `step`, onto the shardings of `targets` (a params
        tree of ShapeDtypeStruct carrying shardings); the optimizer moments stay on disk.
        Raises ConfigError naming the first parameter the checkpoint lacks or holds in another
        shape."""
        saved = self._state_metadata(step)
        wanted = {f"params.{k}": v for k, v in flatten(targets).items()}
        for key, want in wanted.items():
            if key not in saved or tuple(saved[key].shape) != tuple(want.shape):
                raise ConfigError(
                    f"checkpoint {self.directory / str(step)} does not match its config at '{key}'"
                )
        meta = self.read_meta(step)
        try:
            with _quiet(), ocp.PyTreeCheckpointer() as reader:
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
        except Exception as e:
            raise self._unreadable(step, e) from e
        self.verify(step, restored, meta)
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
        saved = self._state_metadata(step)
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
        try:
            with _quiet():
                restored = self.manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:
            raise self._unreadable(step, e) from e
        flat = dict(restored["state"])
        self.verify(step, flat, restored["meta"])
        for key in old:
            del flat[key]
        for key, like in missing.items():
            flat[key] = jax.device_put(np.asarray(defaults[key], like.dtype), like.sharding)
        state = unflatten(abstract_state, flat)
        return state, restored.get("data"), restored["meta"]
