"""Compile targets: the TPU slices and NVIDIA nodes that `perijax plan --target` and the
launchers' pre-flight compile for, with the target's own compiler, on a machine that has none of
its chips ("deviceless" ahead-of-time compilation, as MaxText's train_compile does for TPUs).

- **TPU** (`v5e-16`, `v5p-128`, `v4-32`, `v6e-8`, `2xv5p-128` for two slices): libtpu, from
  the `tpu` or `targets` extra, compiles for a topology given by name
  (`jax.experimental.topologies.get_topology_desc`). The slice names are gcloud's: the number
  counts chips on v5e/v6e and TensorCores (2 per chip) on v4/v5p.
- **NVIDIA** (`h100x8`, `h100x64` = 8 nodes x 8, `h200x8`, `a100x8`): XLA's GPU compiler, from
  the CUDA plugin of the `targets` extra, compiles for the device description shipped in this
  package (XLA's own `*.txtpb` specs). It needs JAX to run on the CPU (`JAX_PLATFORMS=cpu`): with
  a GPU backend started, the plugin looks for a real GPU.

The compiled program is the target compiler's: its memory analysis, its fused-attention custom
calls (splash as Mosaic `tpu_custom_call`s, cuDNN as `__cudnn$fmha*`), its collectives.
`perijax.targets.program` reads them.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.resources
import importlib.util
import re
from typing import Any

from perijax.config import ConfigError

# ------------------------------------------------------------------------------------- TPUs
# generation: (gcloud prefix, number in the name counts TensorCores?, chips per multi-host VM,
# largest single-host slice in chips, default runtime). From the Cloud TPU docs' configuration
# tables (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e): v4-8 / v5p-8 = 4 chips on one host;
# v5e and v6e slices of up to 8 chips are one host, larger ones have 4 chips per host.
GENERATIONS = {
    "v4": ("v4", True, 4, 4, "tpu-ubuntu2204-base"),
    "v5p": ("v5p", True, 4, 4, "v2-alpha-tpuv5"),
    "v5e": ("v5litepod", False, 4, 8, "v2-alpha-tpuv5-lite"),
    "v6e": ("v6e", False, 4, 8, "v2-alpha-tpuv6e"),
}
SIZES_2D = (1, 4, 8, 16, 32, 64, 128, 256)  # v5e and v6e slice sizes in chips
# The 2-D (v5e, v6e) and 3-D (v4, v5p) chip grids of each slice size, as libtpu names them.
GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
           256: "16x16"}  # fmt: skip
GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
           256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16",
           4096: "16x16x16"}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class TpuType:
    """A TPU slice type. JAX sees one device per chip (v4 and v5p chips hold two TensorCores
    that JAX drives as one megacore device) and runs one process per host (TPU VM)."""

    name: str  # gcloud --accelerator-type, e.g. v5litepod-16
    generation: str  # v4 | v5e | v5p | v6e
    chips: int
    hosts: int
    runtime: str  # default runtime version (gcloud --version / --runtime-version)


def tpu_type(text: str) -> TpuType:
    """Parses v4-32, v5p-64, v5litepod-16 (or v5e-16), v6e-16; raises ValueError."""
    m = re.fullmatch(r"(v4|v5p|v5litepod|v5e|v6e)-(\d+)", text)
    if not m:
        raise ValueError(f"{text!r}: expected v4-N, v5p-N, v5litepod-N (v5e-N) or v6e-N")
    prefix, n = m.group(1), int(m.group(2))
    generation = "v5e" if prefix in ("v5litepod", "v5e") else prefix
    gcloud_prefix, counts_cores, per_host, single_host_max, runtime = GENERATIONS[generation]
    if counts_cores:
        if n < 8 or n % 8:
            raise ValueError(
                f"{text}: {generation}-N counts TensorCores (2 per chip) and starts at 8"
            )
        chips = n // 2
    else:
        if n not in SIZES_2D:
            raise ValueError(
                f"{text}: {generation} slices have {', '.join(map(str, SIZES_2D))} chips"
            )
        chips = n
    hosts = 1 if chips <= single_host_max else chips // per_host
    return TpuType(f"{gcloud_prefix}-{n}", generation, chips, hosts, runtime)


# ---------------------------------------------------------------------------------- NVIDIA
# name: (device description in this package, ACCELERATORS entry, GPUs per node)
GPUS = {
    "h100": ("h100_sxm.txtpb", "h100", 8),
    "h200": ("h200.txtpb", "h200", 8),
    "a100": ("a100_sxm_80.txtpb", "a100-80gb", 8),
}


# ----------------------------------------------------------------------------------- targets
@dataclasses.dataclass(frozen=True)
class Target:
    """What a program is compiled for: `chips` devices on `hosts` processes (all slices)."""

    name: str
    platform: str  # the backend traced for (perijax.tuning): "tpu" | "gpu"
    accelerator: str  # perijax.peaks.ACCELERATORS entry (HBM and peak per chip)
    chips: int
    hosts: int
    topology: str  # TPU: "v5e:4x4"; NVIDIA: slices x hosts x devices, "1x8x8"
    slices: int = 1  # TPU multislice
    spec: str = ""  # NVIDIA: the device description file in this package
    chip_config: str = ""  # TPU v4/v5p: "megacore", one JAX device per chip
    chips_per_host_bounds: tuple[int, ...] = ()  # TPU single-host slices of 8 chips

    @property
    def compiler(self) -> str:
        return "libtpu" if self.platform == "tpu" else "XLA GPU"

    @property
    def granule(self) -> str:
        """What `mesh.dcn_data` spans on this target: slices (multislice TPU), else hosts."""
        return "slices" if self.slices > 1 else "hosts"

    @property
    def granules(self) -> int:
        return self.slices if self.slices > 1 else self.hosts

    def describe(self) -> str:
        slices = f" in {self.slices} slices" if self.slices > 1 else ""
        return (
            f"{self.name}: {self.chips} {self.accelerator} chips on {self.hosts} "
            f"host{'s' if self.hosts > 1 else ''}{slices}"
        )


def gpu_node(kind: str, nodes: int, per_node: int) -> Target:
    """`nodes` NVIDIA nodes of `per_node` GPUs of `kind` (h100, h200, a100)."""
    if kind not in GPUS:
        raise ConfigError(f"unknown GPU {kind!r}: one of {', '.join(GPUS)}")
    spec, accelerator, _ = GPUS[kind]
    chips = nodes * per_node
    return Target(
        name=f"{kind}x{chips}" + (f" ({nodes} nodes x {per_node})" if nodes > 1 else ""),
        platform="gpu",
        accelerator=accelerator,
        chips=chips,
        hosts=nodes,
        topology=f"1x{nodes}x{per_node}",
        spec=spec,
    )


def tpu_slices(text: str, slices: int = 1) -> Target:
    """A TPU target from a gcloud accelerator type and a slice count."""
    try:
        t = tpu_type(text)
    except ValueError as e:
        raise ConfigError(f"--target {e}") from e
    if slices < 1:
        raise ConfigError(f"--target: the number of slices must be >= 1, got {slices}")
    grids = GRID_3D if t.generation in ("v4", "v5p") else GRID_2D
    if t.chips not in grids or t.chips < 4:
        sizes = ", ".join(f"{t.generation}-{c * (2 if grids is GRID_3D else 1)}" for c in grids
                          if c >= 4)  # fmt: skip
        raise ConfigError(f"--target {text}: no topology of this size to compile for ({sizes})")
    grid = grids[t.chips]
    name = f"{t.generation}-{t.name.rsplit('-', 1)[1]}"
    return Target(
        name=f"{slices}x{name}" if slices > 1 else name,
        platform="tpu",
        accelerator=f"tpu-{t.generation}",
        chips=t.chips * slices,
        hosts=t.hosts * slices,
        topology=f"{t.generation}:{grid}",
        slices=slices,
        chip_config="megacore" if t.generation in ("v4", "v5p") else "",
        chips_per_host_bounds=(2, 4, 1) if t.hosts == 1 and t.chips == 8 else (),
    )


def parse(text: str) -> Target:
    """A target by name: `v5e-16`, `v5litepod-16`, `v5p-128`, `2xv5p-128` (two slices),
    `h100x8`, `h100x64` (8 nodes x 8 GPUs), `h200x8`, `a100x16`, `4xh100x4` (4 nodes x 4 GPUs).
    Raises ConfigError."""
    m = re.fullmatch(r"(\d+)x(h100|h200|a100)x(\d+)", text)
    if m:  # nodes x GPU x GPUs per node
        nodes, kind, per_node = int(m.group(1)), m.group(2), int(m.group(3))
        if nodes < 1 or per_node < 1:
            raise ConfigError(f"--target {text}: nodes and GPUs per node must be >= 1")
        return gpu_node(kind, nodes, per_node)
    m = re.fullmatch(r"(h100|h200|a100)x(\d+)", text)
    if m:
        kind, n = m.group(1), int(m.group(2))
        per_node = GPUS[kind][2]
        if n < 1 or (n > per_node and n % per_node):
            raise ConfigError(
                f"--target {text}: {kind}xN takes N <= {per_node} (one node) or a multiple of "
                f"{per_node} ({per_node} GPUs per node)"
            )
        return gpu_node(kind, max(1, n // per_node), min(n, per_node))
    m = re.fullmatch(r"(?:(\d+)x)?(v\w+-\d+)", text)
    if m:
        return tpu_slices(m.group(2), int(m.group(1) or 1))
    raise ConfigError(
        f"--target {text!r}: expected a TPU slice (v5e-16, v5p-128, v4-32, v6e-8; 2xv5p-128 for "
        "two slices) or NVIDIA GPUs (h100x8, h100x64 for 8 nodes x 8, h200x8, a100x8, "
        "4xh100x4 for 4 nodes x 4)"
    )


# ---------------------------------------------------------------------------------- compiler
INSTALL = "pip install -c constraints.txt -e '.[targets]' (docs/scaling.md)"


def missing_compiler(target: Target) -> str | None:
    """Why `target`'s compiler cannot run in this environment (None: it can)."""
    if target.platform == "tpu":
        if not _installed("libtpu"):
            return f"the TPU compiler (libtpu) is not installed: {INSTALL}"
        return None
    if not _installed("jax_plugins.xla_cuda12"):
        return f"XLA's GPU compiler (jax-cuda12-plugin) is not installed: {INSTALL}"
    if not _installed("nvidia.cudnn"):
        return f"cuDNN (nvidia-cudnn-cu12), needed to trace cuDNN attention, is missing: {INSTALL}"
    return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


def compiler_version(target: Target) -> str:
    """The compiler that compiles for `target`, with its version and jaxlib's."""
    v = _version
    if target.platform == "tpu":
        return f"libtpu {v('libtpu') or v('libtpu-nightly')} (jaxlib {v('jaxlib')})"
    return (
        f"XLA GPU, jax-cuda12-plugin {v('jax-cuda12-plugin')} (jaxlib {v('jaxlib')}), "
        f"cuDNN {v('nvidia-cudnn-cu12')}"
    )


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def spec_text(target: Target) -> str:
    """The device description of an NVIDIA target (GpuTargetConfigProto, text format)."""
    return importlib.resources.files(__name__).joinpath(target.spec).read_text()


def devices(target: Target) -> list[Any]:
    """The target's compile-only devices (each with its `process_index`, and `slice_index` on a
    multislice TPU). JAX must be running on the CPU for an NVIDIA target (`JAX_PLATFORMS=cpu`)."""
    import jax
    from jax.experimental import topologies

    if target.platform == "tpu":
        kwargs: dict[str, Any] = {}
        if target.chip_config:
            kwargs["chip_config_name"] = target.chip_config
        if target.chips_per_host_bounds:
            kwargs["chips_per_host_bounds"] = target.chips_per_host_bounds
        if target.slices > 1:
            kwargs["num_slices"] = target.slices
        topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu", **kwargs)
    else:
        if jax.default_backend() != "cpu":
            raise ConfigError(
                f"compiling for {target.name} needs JAX on the CPU: run with JAX_PLATFORMS=cpu"
            )
        topo = topologies.get_topology_desc(
            platform="cuda", target_config=spec_text(target), topology=target.topology
        )
    found = list(topo.devices)
    if len(found) != target.chips:
        raise ConfigError(
            f"the {target.compiler} topology {target.topology} has {len(found)} devices, "
            f"{target.chips} were expected for {target.name}"
        )
    return found


def hbm_bytes(target: Target) -> int:
    """Memory per chip: the device description's for NVIDIA, else the ACCELERATORS table's."""
    from perijax.peaks import ACCELERATORS, GIB

    if target.platform == "gpu":
        m = re.search(r"device_memory_size:\s*(\d+)", spec_text(target))
        if m:
            return int(m.group(1))
    return int(ACCELERATORS[target.accelerator][0] * GIB)


def granule_of(device: Any, target: Target) -> int:
    """The slice (multislice TPU) or host a device belongs to."""
    return device.slice_index if target.slices > 1 else device.process_index
