"""What a compiled program holds, read from its optimized HLO text and its jaxpr: the custom
calls (fused attention kernels among them), the collectives with the mesh axes and hosts each
spans, and the Pallas kernels left in interpret mode.

The HLO of an SPMD program names devices by their index in the program's device assignment,
which for `jax.jit` over a `Mesh` is `mesh.devices.flat`: index i has mesh coordinate
`np.unravel_index(i, mesh.devices.shape)`.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# The custom calls that are fused attention kernels: cuDNN's flash attention on NVIDIA GPUs
# (forward and backward), and on TPUs the Mosaic kernels of Pallas splash attention.
CUDNN_ATTENTION = re.compile(r"__cudnn\$fmha")
SPLASH_KERNEL = re.compile(r"splash_mha")

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8\w*|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")  # fmt: skip
_BITS = {"pred": 8, "s4": 4, "u4": 4, "bf16": 16, "f16": 16, "f32": 32, "f64": 64, "c64": 64,
         "c128": 128}  # fmt: skip


def _array_bytes(kind: str, dims: str) -> int:
    bits = _BITS.get(kind) or (8 if kind.startswith("f8") else int(re.sub(r"\D", "", kind)))
    return math.prod(int(d) for d in dims.split(",") if d) * bits // 8


# --------------------------------------------------------------------------------- custom calls
def custom_calls(hlo: str) -> dict[str, int]:
    """How many custom calls of each kind the program holds. Mosaic (TPU Pallas) calls are
    named by their kernel, `tpu_custom_call:<kernel>`, from the op name that lowered them."""
    counts: collections.Counter[str] = collections.Counter()
    for line in hlo.splitlines():
        m = re.search(r'custom_call_target="([^"]+)"', line)
        if not m:
            continue
        target = m.group(1)
        if target == "tpu_custom_call":
            target = f"tpu_custom_call:{_kernel_name(line)}"
        counts[target] += 1
    return dict(sorted(counts.items()))


def _kernel_name(line: str) -> str:
    """The Pallas kernel of a Mosaic call: the instruction's name, which Mosaic sets to the
    kernel's (`%splash_mha_fwd_residuals.4 = ...`), else the op-name component before
    `pallas_call`."""
    m = re.match(r"\s*(?:ROOT\s+)?%?([A-Za-z_][\w\-]*?)(?:\.\d+)*\s*=", line)
    if m and m.group(1) not in ("custom-call", "custom_call"):
        return m.group(1)
    m = re.search(r'op_name="([^"]*)"', line)
    parts = [p for p in (m.group(1) if m else "").split("/") if p]
    if "pallas_call" in parts and parts.index("pallas_call"):
        return parts[parts.index("pallas_call") - 1]
    return "?"


_DEF = re.compile(r"^\s*(?:ROOT\s+)?(%[\w.\-]+)\s*=\s*([a-z]\w*)\[")
_DOT = re.compile(r"\s(?:dot|convolution)\((%[\w.\-]+),\s*(%[\w.\-]+)\)")


def float8_dots(hlo: str) -> dict[str, int]:
    """How many matmul instructions (dot, or convolution, as XLA TPU writes matmuls) take
    float8 operands, by operand types ("f8e4m3fn x f8e4m3fn": the forward of a float8 matmul;
    "f8e5m2 x f8e4m3fn" and its mirror: the two gradients). Counts them wherever they are,
    inside GEMM fusions too (XLA GPU runs those as Triton or cuBLASLt float8 GEMMs)."""
    types: dict[str, str] = {}
    for line in hlo.splitlines():
        if m := _DEF.match(line):
            types[m.group(1)] = m.group(2)
    counts: collections.Counter[str] = collections.Counter()
    for line in hlo.splitlines():
        if m := _DOT.search(line):
            a, b = types.get(m.group(1), "?"), types.get(m.group(2), "?")
            if a.startswith("f8") or b.startswith("f8"):
                counts[f"{a} x {b}"] += 1
    return dict(sorted(counts.items()))


def fused_attention_calls(calls: dict[str, int]) -> dict[str, int]:
    """The custom calls among `calls` that are fused attention kernels (cuDNN, splash)."""
    return {
        name: n for name, n in calls.items() if CUDNN_ATTENTION.search(name) or
        (name.startswith("tpu_custom_call:") and SPLASH_KERNEL.search(name))
    }  # fmt: skip


def square_buffers(hlo: str, n: int) -> int:
    """How many instructions produce an array with two dimensions of length `n`: with `n` the
    sequence length, materialized [T, T] attention scores (which the fused kernels never
    build)."""
    count = 0
    for line in hlo.splitlines():
        head = line.split("=", 1)[1] if "=" in line else ""
        head = head.split("(", 1)[0] if not head.lstrip().startswith("(") else head[:400]
        for _, dims in _ARRAY.findall(head):
            if [int(d) for d in dims.split(",") if d].count(n) >= 2:
                count += 1
                break
    return count


# -------------------------------------------------------------------------------- collectives
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[(?P<mesh>[^\]]*)\]"
    r"(?:,\s*device_ids=\(\[(?P<dims>[\d,]+)\](?:T\((?P<perm>[\d,]+)\))?\))?"
    r"\s*\{(?P<axes>[^}]*)\}"
)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _iota(dims: str, perm: str | None) -> np.ndarray:
    """Device ids `[dims]T(perm)`: iota over the dims, transposed, flattened."""
    ids = np.arange(math.prod(_ints(dims))).reshape(_ints(dims))
    return (ids.transpose(_ints(perm)) if perm else ids).reshape(-1)


def replica_groups(line: str, num_devices: int) -> list[list[int]]:
    """The device groups of one collective instruction: `replica_groups={{0,1},{2,3}}`, the
    iota form `replica_groups=[2,4]<=[4,2]T(1,0)`, the mesh-axes form
    `replica_groups=mesh['axis_0'=4,'axis_1'=16], device_ids=([16,4]T(1,0)) {'axis_0'}` (a mesh
    over the device ids; a group is a line along the named axes), `source_target_pairs={{0,1},
    ...}` (each pair a group), or every device when the groups are empty."""
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        return _iota(m.group(2), m.group(3)).reshape(_ints(m.group(1))).tolist()
    m = _MESH_GROUPS.search(line)
    if m:  # XLA's mesh-axes form: a mesh of named axes over device ids; groups along some axes
        axes = re.findall(r"'([^']+)'=(\d+)", m.group("mesh"))
        sizes = [int(size) for _, size in axes]
        ids = (
            _iota(m.group("dims"), m.group("perm"))
            if m.group("dims")
            else np.arange(math.prod(sizes))
        )
        ids = ids.reshape(sizes)
        chosen = [i for i, (name, _) in enumerate(axes) if f"'{name}'" in m.group("axes")]
        rest = [i for i in range(len(axes)) if i not in chosen]
        per_group = math.prod(sizes[i] for i in chosen)
        return ids.transpose(rest + chosen).reshape(-1, per_group).tolist()
    m = re.search(r"(?:replica_groups|source_target_pairs)=\{((?:\{[\d,]*\},?)*)\}", line)
    if m:
        groups = [
            [int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))
        ]
        groups = [g for g in groups if g]
        if groups:
            return groups
    return [list(range(num_devices))]


@dataclasses.dataclass
class Collective:
    """The collectives of one kind over one set of mesh axes."""

    kind: str
    axes: tuple[str, ...]  # mesh axes whose coordinate varies within a group
    count: int = 0
    bytes: int = 0  # per device, summed over the instructions (each counted once)
    crosses_along: tuple[str, ...] = ()  # mesh axes along which a group crosses hosts

    @property
    def crosses_granules(self) -> bool:
        """Whether some group spans several hosts (or slices)."""
        return bool(self.crosses_along)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "crosses_granules": self.crosses_granules}


def collectives(
    hlo: str,
    mesh_shape: Sequence[int],
    axis_names: Sequence[str],
    granule: Callable[[int], int],
) -> list[Collective]:
    """The program's collectives, grouped by kind and the mesh axes they span, each with the
    axes along which it crosses hosts (`crossing_axes`' rule). `granule(i)` is the host (or
    slice) of device i of the mesh's flat order. A loop body's collectives are counted once, as
    XLA's own analyses do."""
    found: dict[tuple[str, tuple[str, ...]], Collective] = {}
    n = math.prod(mesh_shape)
    seen: dict[tuple, tuple[tuple[str, ...], set[str]]] = {}  # groups -> (axes, crossing)
    for line in hlo.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        groups = replica_groups(line, n)
        key = tuple(map(tuple, groups))
        if key not in seen:
            crossing: set[str] = set()
            for g in groups:
                crossing |= _group_crossing(g, mesh_shape, axis_names, granule)
            seen[key] = (spanned_axes(groups, mesh_shape, axis_names), crossing)
        axes, crossing = seen[key]
        c = found.setdefault((m.group("op"), axes), Collective(m.group("op"), axes))
        c.count += 1
        c.bytes += _payload_bytes(m.group("shape"), bool(m.group("start")))
        c.crosses_along = tuple(sorted(set(c.crosses_along) | crossing))
    return sorted(found.values(), key=lambda c: (-c.bytes, c.kind, c.axes))


def _payload_bytes(shape: str, is_start: bool) -> int:
    """Bytes per device of a collective's result: the arrays of its (tuple) shape; an async
    `-start` carries its operands and results (and context scalars): its largest array."""
    sizes = [_array_bytes(k, d) for k, d in _ARRAY.findall(shape)]
    if not sizes:
        return 0
    return max(sizes) if is_start else sum(sizes)


def spanned_axes(
    groups: Sequence[Sequence[int]], mesh_shape: Sequence[int], axis_names: Sequence[str]
) -> tuple[str, ...]:
    """The mesh axes along which members of a group differ."""
    varying: set[int] = set()
    for g in groups:
        coords = np.array(np.unravel_index(np.asarray(g), tuple(mesh_shape))).T
        varying.update(int(a) for a in np.nonzero((coords != coords[0]).any(axis=0))[0])
    return tuple(axis_names[a] for a in sorted(varying))


def crossing_axes(found: Sequence[Collective]) -> set[str]:
    """The mesh axes along which `collectives(...)` cross hosts (or slices). For every two
    members of a group on different hosts: if their `data` coordinates differ, `data` crosses;
    if they are equal, every axis in which they differ crosses (the host boundary cuts that
    axis). A program whose only cross-host traffic is data parallelism gives {"data"} or
    nothing."""
    return {axis for c in found for axis in c.crosses_along}


def _group_crossing(group, mesh_shape, axis_names, granule) -> set[str]:
    coords = np.array(np.unravel_index(np.asarray(group), tuple(mesh_shape))).T  # [g, axes]
    hosts = np.array([granule(d) for d in group])
    apart = hosts[:, None] != hosts[None, :]  # [g, g]
    if not apart.any():
        return set()
    differ = coords[:, None, :] != coords[None, :, :]  # [g, g, axes]
    out: set[str] = set()
    if "data" in axis_names:
        d = list(axis_names).index("data")
        if (apart & differ[..., d]).any():
            out.add("data")
        cut = apart & ~differ[..., d]  # on different hosts with the same data coordinate
    else:
        cut = apart
    out.update(axis_names[a] for a in np.nonzero(differ[cut].any(axis=0))[0])
    return out


# --------------------------------------------------------------------------- Pallas in jaxprs
def pallas_calls(jaxpr: Any) -> Iterator[Any]:
    """Every `pallas_call` equation of a (closed) jaxpr, nested jaxprs included."""
    from jax.extend import core as jcore

    seen: set[int] = set()

    def walk(j: Any) -> Iterator[Any]:
        j = getattr(j, "jaxpr", j)
        if id(j) in seen:
            return
        seen.add(id(j))
        for eqn in j.eqns:
            if eqn.primitive.name == "pallas_call":
                yield eqn
            for param in eqn.params.values():
                for sub in _jaxprs_in(param, jcore):
                    yield from walk(sub)

    yield from walk(jaxpr)


def _jaxprs_in(value: Any, jcore: Any) -> Iterator[Any]:
    if isinstance(value, (jcore.Jaxpr, jcore.ClosedJaxpr)):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _jaxprs_in(v, jcore)


def interpreted_pallas(jaxpr: Any) -> int:
    """How many Pallas kernels of the jaxpr run in interpret mode (plain XLA ops, not the
    target's kernel): on a TPU target this must be 0."""
    return sum(1 for eqn in pallas_calls(jaxpr) if _interpreting(eqn.params.get("interpret")))


def _interpreting(value: Any) -> bool:
    return bool(value) if isinstance(value, bool) or value is None else True
