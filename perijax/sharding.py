"""Device mesh, the logical-axis rules table, and sharding helpers.

Every parameter carries `logical_axes` metadata (perijax/model.py); `RULES` maps each logical
axis onto mesh axes, once, for parameters, optimizer state, batches and activation constraints.
The mesh has three axes:

- `data`:   pure data parallelism (parameters replicated); spans hosts/slices over the slow network;
- `fsdp`:   data parallelism with parameters, gradients and optimizer state sharded (ZeRO-3);
- `tensor`: tensor (model) parallelism over heads, the MLP hidden dimension and the vocabulary.

The batch is split over `data` × `fsdp`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from perijax.config import ConfigError, MeshConfig, ModelConfig

MESH_AXES = ("data", "fsdp", "tensor")

# The one logical-axis rules table: the only mapping from logical axes to mesh axes
# (docs/scaling.md, "The rules table"). A logical axis maps to a mesh axis, a tuple of mesh
# axes, or None (replicated). Activations use None for their embedding dimension.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "seq": None,
    "embed": "fsdp",
    "heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
}


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves -1 (absorbs the remaining devices) and checks the product."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    for name, size in zip(MESH_AXES, sizes, strict=True):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size} must be a positive size or -1")
    if sizes.count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"mesh {dict(zip(MESH_AXES, sizes, strict=True))}: {num_devices} devices are "
                f"not divisible by the fixed axes' product {known}"
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {num_devices} are available: make the product {num_devices} or use -1"
        )
    return tuple(sizes)


def check_model_fits_mesh(model: ModelConfig, shape: tuple[int, int, int]) -> None:
    """Tensor parallelism splits heads and the MLP; FSDP splits d_model: sizes must divide."""
    _, fsdp, tensor = shape
    if model.num_heads % tensor:
        raise ConfigError(f"mesh.tensor={tensor} must divide model.num_heads={model.num_heads}")
    if model.d_ff % tensor:
        raise ConfigError(f"mesh.tensor={tensor} must divide model.d_ff={model.d_ff}")
    if model.d_model % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} must divide model.d_model={model.d_model}")


# `train.grad_accum_steps=0`: as many micro-batches as leave at most this many tokens per device
# in each (two sequences of 8,192, the paper models' plans in docs/scaling.md), one sequence per
# device at least.
AUTO_TOKENS_PER_DEVICE = 16_384


def grad_accum_for(
    global_batch: int, grad_accum: int, seq_len: int, shape: tuple[int, int, int]
) -> int:
    """`grad_accum`, or for 0 the fewest micro-batches whose rows split evenly over the batch
    shards (data x fsdp) with at most AUTO_TOKENS_PER_DEVICE tokens per device (else one row per
    device). Raises ConfigError when no micro-batch size splits evenly."""
    shards = shape[0] * shape[1]
    if grad_accum:
        check_batch_fits_mesh(global_batch, grad_accum, shape)
        return grad_accum
    even = [a for a in range(1, global_batch + 1)
            if global_batch % a == 0 and (global_batch // a) % shards == 0]  # fmt: skip
    if not even:
        raise ConfigError(
            f"train.global_batch_size={global_batch} cannot be split into micro-batches "
            f"divisible by mesh.data x mesh.fsdp = {shards}: use a multiple of {shards}"
        )
    fitting = [a for a in even if global_batch // a // shards * seq_len <= AUTO_TOKENS_PER_DEVICE]
    return fitting[0] if fitting else even[-1]


def check_batch_fits_mesh(global_batch: int, grad_accum: int, shape: tuple[int, int, int]) -> None:
    shards = shape[0] * shape[1]
    micro = global_batch // grad_accum
    if micro % shards:
        raise ConfigError(
            f"the micro-batch (train.global_batch_size / train.grad_accum_steps = {micro}) must "
            f"be divisible by mesh.data x mesh.fsdp = {shards}"
        )


def make_mesh(cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh laid out on the physical topology.

    With `mesh.dcn_data > 1` the data axis is split into that many groups of hosts/slices
    (data parallelism crosses the slow network; fsdp and tensor stay inside a host or slice).
    """
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    if cfg.dcn_data > 1:
        if shape[0] % cfg.dcn_data:
            raise ConfigError(f"mesh.dcn_data={cfg.dcn_data} must divide mesh.data={shape[0]}")
        ici = (shape[0] // cfg.dcn_data, shape[1], shape[2])
        # Granules are slices (multislice TPU) when there are several, else hosts (processes).
        slices = {getattr(d, "slice_index", 0) for d in devices}
        by_process = len(slices) == 1
        granules = len({d.process_index if by_process else d.slice_index for d in devices})
        if granules != cfg.dcn_data:
            kind = "processes" if by_process else "slices"
            raise ConfigError(
                f"mesh.dcn_data={cfg.dcn_data} must equal the number of {kind} ({granules})"
            )
        grid = mesh_utils.create_hybrid_device_mesh(
            ici, (cfg.dcn_data, 1, 1), devices, process_is_granule=by_process
        )
    else:
        try:
            grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        except (ValueError, NotImplementedError, AssertionError):
            # Topologies the helper does not know (e.g. CPU in several processes): keep the
            # device order, which groups each process's devices together.
            grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(
    axes: Sequence[str | None], mesh: Mesh | None = None, shape=None
) -> PartitionSpec:
    """PartitionSpec for logical axes. With `mesh` and `shape`, a dimension whose size is not
    divisible by its mesh axes is replicated instead (e.g. 8 kv heads on tensor=16, or a vocab
    of 100,277 on tensor=2), and mesh axes of size 1 are dropped."""
    spec = []
    used: set[str] = set()
    for i, axis in enumerate(axes):
        mesh_axes = RULES.get(axis) if axis is not None else None
        if mesh_axes is None:
            spec.append(None)
            continue
        mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        mesh_axes = tuple(a for a in mesh_axes if a not in used)
        if mesh is not None:
            mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
            size = math.prod(mesh.shape[a] for a in mesh_axes)
            if shape is not None and shape[i] % size:
                mesh_axes = ()
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
    return PartitionSpec(*spec)


def variable_axes(var: nnx.Variable, ndim: int) -> tuple[str | None, ...]:
    """A variable's logical axes; stacked (scanned) layers add a leading `layers` axis."""
    axes = tuple(var.get_metadata().get("logical_axes") or ())
    if len(axes) == ndim - 1:
        axes = ("layers",) + axes
    if len(axes) != ndim:
        axes = (None,) * ndim
    return axes


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def state_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a pytree holding nnx Variables (params, optimizer moments) and plain
    arrays (step counters: replicated). Returns a tree-prefix usable as jit in/out shardings."""

    def sharding(x: Any) -> NamedSharding:
        if _is_variable(x):
            value = x.get_value()
            if not hasattr(value, "ndim"):  # e.g. optax.MaskedNode: no array to place
                return NamedSharding(mesh, PartitionSpec())
            spec = logical_to_spec(variable_axes(x, value.ndim), mesh, value.shape)
            return NamedSharding(mesh, spec)
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, tree, is_leaf=_is_variable)


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch arrays are split over data x fsdp along their first axis."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), mesh))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """Activation sharding constraint by logical axes; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, mesh, x.shape))


def shards(axis: str, size: int, mesh: Mesh | None = None) -> int:
    """Into how many pieces `mesh` (default: the current abstract mesh, inside a trace) cuts a
    dimension of `size` whose logical axis is `axis`, by the rules table; 1 outside a mesh."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    mesh_axes = logical_to_spec((axis,), mesh, (size,))[0] or ()
    mesh_axes = (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
    return math.prod(mesh.shape[a] for a in mesh_axes)


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]):
    """Assembles the global batch from this process's rows (its contiguous block of axis 0)."""
    if jax.process_count() == 1:
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def replicated_batch(array: np.ndarray, sharding: NamedSharding):
    """A global array from data every process holds in full (e.g. fixed eval batches)."""
    if jax.process_count() == 1:
        return jax.device_put(array, sharding)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def describe(mesh: Mesh) -> str:
    return " x ".join(f"{name}={size}" for name, size in mesh.shape.items())
